"""The OpenADR 3 facade's events and notifications, produced from the hub's change feed.

One follower of :class:`~cloud_hub.feed.ChangeFeed` (as the DSO, the issuer of every flexibility request) watches
the requests of the event types. When a request is created, revised or cancelled it writes, for each VEN its
clients were addressed to (their supplier at the request's time, as the bridges get it), that VEN's index row
``evt|<ven>|<request>`` (what ``GET /events`` lists) and notifies the VEN: on the hub broker, on the VEN's own
topic (:func:`mhp_wire.topics.openadr3_ven`, readable only by that VEN through the broker's ACL), and to every
webhook subscription of that VEN. Each notification carries the event as that VEN sees it (its own clients only).

The follower's cursor (the last feed event handled) is stored after each change, so a restarted hub resumes where
it stopped; a notification is sent at least once (a VEN deduplicates by the event's id and modificationDateTime).
Webhook deliveries are retried with :class:`mhp_wire.backoff.Backoff` up to ``max_age_s``; they live in memory:
a hub restarted while one is being retried does not retry it (the VEN's ``GET /events`` still shows the event).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from cloud_hub.authz import Action, Context, Principal, decide
from cloud_hub.book import OutcomeVerdict, ReportedOutcome
from cloud_hub.feed import ChangeFeed
from cloud_hub.openadr3 import mapping
from cloud_hub.relay import HubRelay
from cloud_hub.storage import Mutation, prefix_stop
from cloud_hub.store import HubStore
from cloud_hub.webhooks import TargetRefused, Webhooks
from mhp_wire import topics
from mhp_wire.backoff import Backoff
from mhp_wire.groupcommit import GroupCommit
from mhp_wire.messages import SEND_PAYLOAD_BYTES
from mhp_wire.mqtt import MqttError

log = logging.getLogger(__name__)

TABLE = "openadr3"
CURSOR_ROW = "~cursor"
OPERATIONS = ("CREATE", "UPDATE", "DELETE")


def may_report(retailer_id: str, addressed: list[str]) -> bool:
    """The authorization of one reported outcome (``authz`` ``REPORT_OUTCOME``), asked by the book."""
    return decide(Principal("retailer", retailer_id), Action.REPORT_OUTCOME,
                  Context(addressed_retailers=tuple(addressed))).allowed


def _j(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


class Notifier:
    """Turns the hub's requests into OpenADR events per VEN and notifies the VENs (MQTT and webhooks)."""

    def __init__(self, store: HubStore, feed: ChangeFeed, relay: HubRelay, hooks: Webhooks, *,
                 replica_id: str | None = None, now: Callable[[], float] = time.time,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.store = store
        self.kv = store.kv
        self.feed = feed
        self.relay = relay
        self.hooks = hooks
        self.cursor_row = CURSOR_ROW if replica_id is None else f"{CURSOR_ROW}|{replica_id}"
        """Each hub replica follows its own feed (the changes it writes), so each keeps its own cursor."""
        self.now = now
        self.sleep = sleep
        self.subscriptions: dict[str, dict[str, Any]] = {}
        self.vens: dict[str, str] = {}
        """The retailers registered as VENs (``POST /vens``), each with the OpenADR version of the base path it
        registered on (its MQTT notifications' shape of ``targets``): only their events are indexed and notified,
        so a platform whose retailers all run bridges pays nothing for the door."""
        self._seen: dict[str, tuple[str, int | None, str | None]] = {}
        self._task: asyncio.Task[None] | None = None
        self._deliveries: set[asyncio.Task[None]] = set()
        self._http = httpx.AsyncClient(timeout=hooks.policy.timeout_s, follow_redirects=False, trust_env=False)
        self.sent = {"mqtt": 0, "mqtt_too_big": 0, "webhook": 0, "webhook_failed": 0}
        self._outcomes: GroupCommit[ReportedOutcome, OutcomeVerdict] = GroupCommit(
            self._commit_outcomes, max_batch=500, name="openadr3-outcomes")

    async def apply_outcomes(self, outcomes: list[ReportedOutcome]) -> list[OutcomeVerdict]:
        """Apply VENs' reported outcomes as the relay applies bridges' (``RequestBook.apply_outcomes``), reports
        that arrive together in one group commit; raises what the commit raised (StoreUnavailable: 503)."""
        results = await asyncio.gather(*(self._outcomes.submit(o) for o in outcomes), return_exceptions=True)
        verdicts = []
        for r in results:
            if isinstance(r, BaseException):  # the commit's error, handed to each report of it
                raise r
            verdicts.append(r)
        return verdicts

    async def _commit_outcomes(self, batch: list[ReportedOutcome]) -> list[OutcomeVerdict]:
        # An error reaches each waiting report (GroupCommit): its HTTP answer says it was not stored.
        return await self.relay.book.apply_outcomes(batch, may_report)

    async def start(self) -> None:
        """Load the subscriptions and follow the feed from the stored cursor (from now on, the first time)."""
        # A VEN registered before the versions were told apart was notified in 3.0's shape: it still is.
        self.vens = {r[len("ven|"):]: json.loads(c["d:o"]).get("version", mapping.SPEC_VERSION_30)
                     for r, c in await self.kv.scan(TABLE, start="ven|", stop=prefix_stop("ven|"), columns=["d:o"])}
        for _, cells in await self.kv.scan(TABLE, prefix="sub|"):
            sub = json.loads(cells["d:o"])
            self.subscriptions[sub["id"]] = sub
        row = await self.kv.get(TABLE, self.cursor_row)
        cursor = int(row["d:c"]) if row else self.feed.watermark
        self._task = asyncio.create_task(self._run(cursor), name="openadr3-notifier")

    async def close(self) -> None:
        """Stop following and delivering."""
        for task in [self._task, *self._deliveries]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self._http.aclose()

    async def _run(self, cursor: int) -> None:
        dso = Principal("dso")
        while True:
            try:
                # (summary: it reads the request's own fields of a change, never the clients an event names)
                async for item in self.feed.follow(dso, since=cursor, keepalive_s=3600, summary=True):
                    if item.kind != "request":
                        continue
                    if await self.on_change(item.data):
                        await self.kv.batch([Mutation(TABLE, self.cursor_row, {"d:c": str(item.event_id).encode()})])
                    cursor = max(cursor, item.event_id)
            except asyncio.CancelledError:
                raise
            except Exception:  # a storage failure: resume from the cursor after a pause
                log.exception("openadr3 notifier failed; resuming from feed event %d", cursor)
                await self.sleep(1.0)

    async def on_change(self, change: dict[str, Any]) -> bool:
        """Handle one change of a request (as the feed shows it to the DSO); returns whether it made an event."""
        if change.get("type") not in mapping.PROGRAM_OF_TYPE or not self.vens:
            return False
        rid = change["request_id"]
        if not await self._moved(rid, change):
            return False  # a client's progress: nothing an OpenADR event shows
        req = await self.store.get_request(rid, ["r:", "c:"])
        if req is None:
            return False
        writes, notes = await self._ven_changes(rid, req["meta"], req["clients"])
        if writes:  # every VEN's index in one write, then the notifications (GET /events agrees with them)
            await self.kv.batch(writes)
        for ven, op, event in notes:
            await self.notify(ven, "EVENT", op, event)
        return True

    async def _moved(self, rid: str, change: dict[str, Any]) -> bool:
        """Whether the request's state, revision or phase differs from the last change seen of it (remembered)."""
        phase = None
        if change["type"] == "load_reduction":  # its second phase changes who is asked what: one cell read
            phase = (await self.store.get_request_cells(rid, ["r:phase"])).get("r:phase")
        key = (change["state"], change.get("revision"), phase)
        if self._seen.get(rid) == key:
            return False
        self._seen[rid] = key
        if len(self._seen) > 50_000:
            self._seen.pop(next(iter(self._seen)))
        return True

    async def _ven_changes(self, rid: str, meta: dict[str, Any], clients: dict[str, Any]
                           ) -> tuple[list[Mutation], list[tuple[str, str, dict[str, Any]]]]:
        """Each VEN's event operation on the request: the writes to its index, and the notifications to send."""
        by_ven = {v: cs for v, cs in mapping.clients_by_ven(clients).items() if v in self.vens}
        rows = await self.kv.get_many(TABLE, [f"evt|{v}|{rid}" for v in by_ven])
        revision = int(meta.get("revision", 1))
        phase = meta.get("phase")
        writes: list[Mutation] = []
        notes: list[tuple[str, str, dict[str, Any]]] = []
        for ven, mine in by_ven.items():
            row = rows.get(f"evt|{ven}|{rid}")
            seen = json.loads(row["d:o"]) if row else None
            found = _event_operation(rid, meta, clients, ven, mine, seen)
            if found is None:
                continue
            op, event = found
            if op == "DELETE":
                writes.append(_delete(f"evt|{ven}|{rid}"))
            else:
                writes.append(_put(f"evt|{ven}|{rid}", {"revision": revision, "phase": phase,
                                                        "created_at": meta["created_at"],
                                                        "program": event["programID"], "clients": mine}))
            notes.append((ven, op, event))
        return writes, notes

    async def notify(self, ven: str, object_type: str, operation: str, obj: dict[str, Any]) -> None:
        """Tell ``ven`` of a change of one of its objects: on its MQTT topic (the object's ``targets`` in the shape
        of the version the VEN registered with) and to its webhook subscriptions (in the shape of the version each
        was made with); 3.0's shape for those stored before the versions were told apart."""
        bodies: dict[str, bytes] = {}

        def shaped(version: str) -> bytes:
            if version not in bodies:
                out = obj if "targets" not in obj else {**obj, "targets": mapping.targets_out(obj["targets"], version)}
                bodies[version] = _j({"objectType": object_type, "operation": operation, "object": out})
            return bodies[version]

        body = shaped(self.vens.get(ven, mapping.SPEC_VERSION_30))
        link = self.relay.link
        if len(body) > SEND_PAYLOAD_BYTES:
            # An event naming thousands of a VEN's clients: its PUBLISH would be over the brokers' packet, and the
            # hub broker would cut the hub's link for it, again at every reconnection. Its webhooks still get it.
            self.sent["mqtt_too_big"] += 1
            log.warning("openadr3: MQTT notification of %s %s to VEN %s not sent: %d bytes, over the %d the brokers "
                        "pass; its webhooks and its GET show the object", object_type, obj.get("id"), ven, len(body),
                        SEND_PAYLOAD_BYTES)
        elif link is not None:
            try:
                await link.publish(topics.openadr3_ven(ven, object_type.lower() + "s", operation.lower()), body,
                                   wait_s=5.0)
                self.sent["mqtt"] += 1
            except MqttError as exc:
                log.warning("openadr3: MQTT notification to VEN %s not sent (%s); its GET shows the object", ven,
                            exc)
        owner = f"retailer:{ven}"
        for sub in list(self.subscriptions.values()):
            if sub["owner"] != owner:
                continue
            if sub.get("programID") and obj.get("programID") and sub["programID"] != obj["programID"]:
                continue
            for oo in sub["objectOperations"]:
                if object_type in oo["objects"] and (operation in oo["operations"] or "ALL" in oo["operations"]
                                                     or _verb(operation) in oo["operations"]):
                    hook_body = shaped(sub.get("version", mapping.SPEC_VERSION_30))
                    task = asyncio.create_task(self._deliver(oo["callbackUrl"], oo.get("bearerToken"), hook_body),
                                               name=f"openadr3-webhook-{sub['id']}")
                    self._deliveries.add(task)
                    task.add_done_callback(self._deliveries.discard)
                    break

    async def _deliver(self, url: str, bearer: str | None, body: bytes) -> None:
        headers = {"Content-Type": "application/json", "User-Agent": "mhp-hub-openadr3/1"}
        if bearer:
            headers["Authorization"] = f"Bearer {bearer}"
        policy = self.hooks.policy
        first = self.now()
        backoff = Backoff(initial_s=policy.retry_initial_s, max_s=policy.retry_max_s)
        while True:
            try:
                await self.hooks.check(url)  # again at every delivery: the name may resolve elsewhere now
                answer = await self._http.post(url, content=body, headers=headers)
                if 200 <= answer.status_code < 300:
                    self.sent["webhook"] += 1
                    return
                problem = f"answered {answer.status_code}"
            except TargetRefused as exc:
                problem = str(exc)
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            age = self.now() - first
            if age >= policy.max_age_s:
                self.sent["webhook_failed"] += 1
                log.warning("openadr3: notification to %s dropped after %.0f s (%s)", url, age, problem)
                return
            await self.sleep(min(backoff.record_failure(self.now()), max(0.0, policy.max_age_s - age)))

    # -- the VENs' index and subscriptions ---------------------------------------------------------------

    async def event_ids(self, ven: str) -> list[tuple[str, dict[str, Any]]]:
        """``(request_id, index entry)`` of every event of ``ven``, newest first."""
        prefix = f"evt|{ven}|"
        rows = await self.kv.scan(TABLE, start=prefix, stop=prefix_stop(prefix))
        out = [(r[len(prefix):], json.loads(c["d:o"])) for r, c in rows]
        return sorted(out, key=lambda x: -float(x[1]["created_at"]))

    async def put_subscription(self, sub: dict[str, Any]) -> None:
        """Store a subscription and start notifying it."""
        await self.kv.batch([_put(f"sub|{sub['id']}", sub)])
        self.subscriptions[sub["id"]] = sub

    async def delete_subscription(self, sub_id: str) -> None:
        """Stop notifying a subscription and forget it."""
        await self.kv.batch([_delete(f"sub|{sub_id}")])
        self.subscriptions.pop(sub_id, None)


def _event_operation(rid: str, meta: dict[str, Any], clients: dict[str, Any], ven: str, mine: list[str],
                     seen: dict[str, Any] | None) -> tuple[str, dict[str, Any]] | None:
    """What ``ven`` is told of the request's event, given what its index ``seen``: CREATE, UPDATE (a new revision or
    phase) or DELETE (cancelled, or none of its clients disconnected any more), with the event; None: nothing."""
    event = mapping.event_for(rid, meta, clients, ven, mine)
    if meta["state"] == "cancelled" or event is None:  # cancelled; or none of its clients disconnected
        if seen is None:
            return None
        event = event or mapping.event_for(rid, {**meta, "phase": None}, clients, ven, mine)
        return None if event is None else ("DELETE", event)
    if seen is None:
        return "CREATE", event
    if seen["revision"] != int(meta.get("revision", 1)) or seen.get("phase") != meta.get("phase"):
        return "UPDATE", event
    return None


def _verb(operation: str) -> str:
    """The HTTP verb of an operation (OpenADR 3.0 subscriptions name operations by verb: POST, PUT, DELETE)."""
    return {"CREATE": "POST", "UPDATE": "PUT", "DELETE": "DELETE"}[operation]


def _put(row: str, obj: dict[str, Any]) -> Mutation:
    return Mutation(TABLE, row, {"d:o": _j(obj)})


def _delete(row: str) -> Mutation:
    return Mutation(TABLE, row, delete=[])
