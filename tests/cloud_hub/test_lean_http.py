"""The lean path of the hot routes (``cloud_hub.lean``) answers exactly as FastAPI does: the same requests, good and
hostile, sent over real HTTP to a hub with it and to one without it get the same status, headers (but ``date``)
and JSON value, count the same refusals, and store the same request; and the lean hub really answered the good
ones itself (its ``lean_answered``), while the other answered none that way."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from cloud_hub.tokens import TokenBook
from tests.broker_fixtures import MosquittoFactory
from tests.hub_fixtures import HubHandle, running_hub
from tests.waiting import eventually

LIMIT = 2048
"""Both hubs' body limit (``max_body_bytes`` and ``max_client_list_body_bytes``): an oversize body is cheap."""

def at(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


def good_body(path: str) -> dict[str, Any]:
    """A body each hot route accepts, its times from now (a sequence is built when its test starts)."""
    return {
        "/v1/emergencies": {"client_ids": ["c1", "c2"], "start": at(60), "duration_s": 600, "power_limit_kw": 1.5},
        "/v1/load-shifts": {"client_ids": ["c1"], "window_start": at(60), "window_end": at(3600), "reason": "test"},
        "/v1/load-reductions": {"client_ids": ["c1", "c2"], "reduction_kw": 1.5, "start": at(60), "duration_s": 900,
                                "respond_within_s": 3.0},
        "/v1/billing-data": {"client_ids": ["c2"], "period_start": at(-2 * 86400), "period_end": at(-86400)},
    }[path]


HOT_POSTS = ("/v1/emergencies", "/v1/load-shifts", "/v1/load-reductions", "/v1/billing-data")


@dataclass
class Step:
    """One HTTP request of the sequence: ``who`` is a principal of the hub's tokens (or ``expired``, ``unknown``,
    None); ``path`` may name an earlier step's request id as ``{n}``; ``content`` is the raw body."""

    method: str
    path: str
    who: str | None = "dso"
    content: bytes | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    auth: Callable[[str], str] = "Bearer {}".format
    chunked: bool = False
    """``content`` sent in two chunks without ``Content-Length``."""


def post(path: str, content: bytes | str, *headers: tuple[str, str], who: str | None = "dso",
         content_type: str | None = "application/json") -> Step:
    raw = content.encode() if isinstance(content, str) else content
    more = [("Content-Type", content_type)] if content_type is not None else []
    return Step("POST", path, who, raw, [*more, *headers])


def good(path: str, *headers: tuple[str, str], who: str | None = "dso", **over: Any) -> Step:
    return post(path, json.dumps({**good_body(path.partition("?")[0].rstrip("/")), **over}), *headers, who=who)


def sequence() -> list[Step]:
    """Good requests of each hot route first (steps 0-5 create requests 0-5), then the hostile ones."""
    emergency = "/v1/emergencies"
    steps = [good(path, ("Idempotency-Key", f"k-{i}")) for i, path in enumerate(HOT_POSTS)]
    steps += [good(emergency), good("/v1/load-shifts", reason="no key")]
    steps += [Step("GET", f"/v1/requests/{{{n}}}") for n in range(6)]
    steps += [
        good(emergency, ("Idempotency-Key", "k-0")),  # the same key and body: the first answer again
        good(emergency, ("Idempotency-Key", "k-0"), duration_s=60),  # the same key, another body: 409
        good(emergency, ("Idempotency-Key", "x" * 201)),  # too long a key: 422
        good(emergency, ("Idempotency-Key", "")),
        good(emergency, ("Idempotency-Key", "a"), ("Idempotency-Key", "b")),
        post(emergency, '{"client_ids": ["c1"'),  # malformed JSON
        post(emergency, '{"client_ids": ["c1"], "start": 5, "duration_s": "long", "power_limit_kw": true}'),
        good(emergency, bogus=1),  # an extra field
        # a duplicate key: the last one counts (a good body, then a refused one)
        post(emergency, '{"client_ids": ["nope"], ' + json.dumps(good_body(emergency))[1:]),
        post(emergency, '{"client_ids": ["c1"], ' + json.dumps({**good_body(emergency), "client_ids": ["c 1"]})[1:]),
        post(emergency, ""), post(emergency, "null"), post(emergency, "[]"), post(emergency, "NaN"),
        post(emergency, b'{"client_ids": ["c\xff"]}'), post(emergency, '{"client_ids": ["\\ud800"]}'),
        post(emergency, "[" * 1000 + "]" * 1000),
        good(emergency, client_ids=["c1"] * 2),
        good(emergency, client_ids=["unknown-client"]),  # refused by the use case
        good("/v1/load-shifts", window_end=at(30)),  # the window ends before it starts
        good(emergency, start=at(-3600)),
        good("/v1/billing-data", period_end=at(-3 * 86400)),
        post(emergency, "{}", content_type=None), post(emergency, "{}", content_type="text/plain"),
        good(emergency, ("Content-Type", "application/json")),  # two content types
        post("/v1/load-shifts", '{"client_ids": ["c1"]}', content_type="application/json; charset=utf-8"),
        post("/v1/billing-data", '{"client_ids": ["c1"]}', content_type="application/merge-patch+json"),
        post(emergency, "{}", content_type="application/x-www-form-urlencoded"),
        good(emergency, who=None), good(emergency, who="unknown"), good(emergency, who="expired"),
        good(emergency, who="r1"), good(emergency, who="admin"),
        Step("POST", emergency, "dso", b"{}", [("Content-Type", "application/json")], "Basic {}".format),
        Step("POST", emergency, "dso", b"{}", [("Content-Type", "application/json")], "bearer   {}".format),
        Step("GET", "/v1/requests/{0}", "dso", None, [], "Bearer".format),
        Step("GET", "/v1/requests/{0}", "dso", None, [("Authorization", "Bearer x")]),  # a second one
        post(emergency, "x" * (LIMIT + 1)),  # oversize, announced
        Step("POST", emergency, "dso", b" " * (LIMIT + 1), [("Content-Type", "application/json")], chunked=True),
        Step("POST", emergency, "dso", b'{"client_ids": ["c1"]}', [("Content-Type", "application/json")],
             chunked=True),
        good(emergency.replace("emergencies", "emergencies/")), good(emergency + "?x=1"),
        Step("GET", "/v1/requests/unknown-id"), Step("GET", "/v1/requests/{0}", who="r1"),
        Step("GET", "/v1/requests/{0}", who="admin"), Step("GET", "/v1/requests/" + "r" * 65),
        Step("GET", "/v1/requests/{0}/"), Step("GET", "/v1/requests/{0}?verbose=1"),
        Step("GET", "/v1/requests/"), Step("GET", "/v1/requests/a%2Fb"), Step("GET", "/v1/requests/{0}", None),
        Step("GET", "/v1/requests/{0}", "dso", b"{}", [("Content-Type", "application/json")]),
        Step("HEAD", "/v1/requests/{0}"), Step("OPTIONS", emergency), Step("PUT", emergency, content=b"{}"),
        Step("DELETE", "/v1/requests/{0}"), Step("GET", emergency),
        good(emergency, ("Idempotency-Key", "k-0")),  # after everything: still the first answer
    ]
    return steps


CREATING = len(HOT_POSTS) + 2
"""The steps of ``sequence()`` that create a request."""

TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")


def normalised(value: Any, ids: list[str]) -> Any:
    """``value`` with the hub's own request ids named by their order (``<id n>``) and times of its own clock (ISO
    strings, and numbers under a ``trace``) as ``<time>``: the only parts two hubs answer differently."""
    if isinstance(value, dict):
        return {k: ("<times>" if k == "trace" else normalised(v, ids)) for k, v in value.items()}
    if isinstance(value, list):
        return [normalised(v, ids) for v in value]
    if isinstance(value, str):
        for n, rid in enumerate(ids):
            value = value.replace(rid, f"<id {n}>")
        return "<time>" if TIME.match(value) else value
    return value


@dataclass
class Answer:
    status: int
    headers: list[tuple[str, str]]
    json: Any


async def chunks(content: bytes) -> AsyncIterator[bytes]:
    half = len(content) // 2
    yield content[:half]
    yield content[half:]


async def replay(hub: HubHandle, steps: list[Step], ids: list[str], creating: int) -> list[Answer]:
    """Send ``steps`` in turn (httpx opens a new connection where the hub closed one), ``ids`` filled with the
    request ids of the first ``creating`` steps. Headers but ``date`` and ``content-length`` are kept, the hub's
URL in them named ``<hub>`` and ids as in bodies (a length
    is checked against its body: two hubs' times and ids may differ in length); ``ids`` gets every new request id
answered, in order."""
    answers = []
    for n, step in enumerate(steps):
        path = step.path.format(*ids) if "{" in step.path else step.path
        headers = list(step.headers)
        if step.who is not None:
            headers.insert(0, ("Authorization", step.auth(hub.tokens[step.who])))
        content = chunks(step.content) if step.chunked and step.content else step.content
        r = await hub.http.request(step.method, path, content=content, headers=headers)
        if "content-length" in r.headers and step.method != "HEAD":
            assert int(r.headers["content-length"]) == len(r.content), r.headers
        try:
            value = r.json()
        except ValueError:
            value = r.text
        if n < creating:
            assert r.status_code == 202, (n, r.text)
        if r.status_code == 202 and r.json()["request_id"] not in ids:
            ids.append(r.json()["request_id"])
        kept = [(k, normalised(v.replace(hub.url, "<hub>"), ids)) for k, v in r.headers.multi_items()
                if k not in ("date", "content-length")]
        answers.append(Answer(r.status_code, kept, normalised(value, ids)))
    return answers


@contextlib.asynccontextmanager
async def two_hubs(request: pytest.FixtureRequest, tmp_path: Path, mosquitto_factory: MosquittoFactory,
                   **settings: Any) -> AsyncIterator[tuple[HubHandle, HubHandle]]:
    """A hub with the lean path and one without, the same settings, clients c1 (r1) and c2 (r2), and in each an
    ``expired`` and an ``unknown`` token. The first sends' ``sent`` marks wait 60 s, longer than the test: settled
    after 2 s (the default), a client read ``sent`` on the hub asked later and ``pending`` on the other whenever the
    replays straddled the settling (seen on a loaded machine)."""
    settings = {"sent_settle_s": 60.0, **settings}  # the most a hub allows: longer than any replay here
    async with contextlib.AsyncExitStack() as stack:
        hubs = []
        for lean in (True, False):
            folder = tmp_path / ("lean" if lean else "full")
            folder.mkdir()
            hub = await stack.enter_async_context(contextlib.asynccontextmanager(running_hub)(
                request, folder, mosquitto_factory, "sqlite", lean=lean, max_body_bytes=LIMIT,
                max_client_list_body_bytes=LIMIT, **settings))
            await hub.setup_registry({"c1": "r1", "c2": "r2"})
            hub.tokens["expired"] = TokenBook(folder / "tokens.json").issue("dso", expires_in_s=-1)
            hub.tokens["unknown"] = "not-a-token-of-this-hub"
            hubs.append(hub)
        yield hubs[0], hubs[1]


async def rejected(hub: HubHandle) -> list[str]:
    text = (await hub.http.get("/metrics")).text
    return sorted(line for line in text.splitlines() if line.startswith("mhp_http_rejected_total"))


async def test_the_lean_path_answers_every_request_as_fastapi_does(
        request: pytest.FixtureRequest, tmp_path: Path, mosquitto_factory: MosquittoFactory) -> None:
    steps = sequence()
    async with two_hubs(request, tmp_path, mosquitto_factory) as (lean, full):
        lean_ids: list[str] = []
        full_ids: list[str] = []
        lean_answers = await replay(lean, steps, lean_ids, CREATING)
        full_answers = await replay(full, steps, full_ids, CREATING)
        for step, a, b in zip(steps, lean_answers, full_answers, strict=True):
            assert a == b, (step.method, step.path, step.headers, step.content)
        assert await rejected(lean) == await rejected(full)
        assert len(await rejected(lean)) >= 5
        statuses = {a.status for a in lean_answers}
        assert {200, 202, 401, 403, 404, 405, 409, 413, 422} <= statuses, statuses
        # Not vacuous: the lean hub answered the good requests of every hot route itself, FastAPI none of them.
        answered = lean.app.state.lean_answered
        assert {f"POST {p}" for p in HOT_POSTS} | {"GET /v1/requests/{request_id}"} <= set(answered), answered
        assert answered["GET /v1/requests/{request_id}"] >= 6 and answered["POST /v1/emergencies"] >= 3
        assert not full.app.state.lean_answered
        # The same requests stored: each created request's row, read from each hub's store. Each hub's dispatcher
        # writes a request's first dispatch time once its first publish returned, on its own time: the lean hub's
        # requests, replayed first, can be dispatched when the full hub's last are not yet (seen in a full suite under
        # load). So each pair is read until both have settled alike (or 10 s), then compared to show any difference.
        async def both(lean_id: str, full_id: str) -> tuple[Any, Any]:
            lean_row = await lean.app.state.store.get_request(lean_id)
            full_row = await full.app.state.store.get_request(full_id)
            assert lean_row is not None and full_row is not None
            return normalised(stored(lean_row), lean_ids), normalised(stored(full_row), full_ids)

        for lean_id, full_id in zip(lean_ids, full_ids, strict=True):
            async def alike(lean_id: str = lean_id, full_id: str = full_id) -> bool:
                lean_stored, full_stored = await both(lean_id, full_id)
                return bool(lean_stored == full_stored)

            with contextlib.suppress(AssertionError):
                await eventually(alike, f"request {lean_id} stored as {full_id}")
            lean_stored, full_stored = await both(lean_id, full_id)
            assert lean_stored == full_stored


def stored(row: dict[str, Any]) -> Any:
    """A stored request without what its hub's clock and counters wrote: times (seconds since the epoch) and
    durations (``*_ms``) in its cells, its outbox messages' ids and send times (the messages in retailer order)."""

    def timeless(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: timeless(v) for k, v in value.items() if not k.endswith("_ms")}
        return "<time>" if isinstance(value, float) and value > 1e9 else value

    outbox = sorted(row.get("outbox", {}).values(), key=lambda m: (m["retailer_id"], m["clients"]))
    messages = [{**m, "payload": {k: v for k, v in json.loads(m["payload"]).items() if k not in ("msg_id", "sent_at")}}
                for m in outbox]
    return {**timeless({k: v for k, v in row.items() if k != "outbox"}), "outbox": messages}


async def test_a_rate_limited_caller_is_refused_alike_and_its_turn_taken_once(
        request: pytest.FixtureRequest, tmp_path: Path, mosquitto_factory: MosquittoFactory) -> None:
    """Two clients' registration takes two of the DSO's five turns; then three requests pass (a good one on the lean
    path, a refused body on FastAPI's, a GET on the lean path) and the rest are 429, whichever path would have
    answered them: a fallback does not take a second turn."""
    steps = [good("/v1/emergencies"), post("/v1/emergencies", "{}"), Step("GET", "/v1/requests/{0}"),
             good("/v1/load-shifts"), post("/v1/emergencies", "{}"), Step("GET", "/v1/requests/{0}")]
    async with two_hubs(request, tmp_path, mosquitto_factory, rate_limit_per_s=0.001, rate_limit_burst=5) as hubs:
        answers = [await replay(hub, steps, [], 1) for hub in hubs]
        for a, b in zip(*answers, strict=True):  # the wait left is the bucket's, as of when each hub was asked
            if a.status == 429:
                assert abs(a.json.pop("retry_after_s") - b.json.pop("retry_after_s")) < 5
                assert a.json.pop("message").startswith("rate limit exceeded for dso: retry in ")
                assert b.json.pop("message").startswith("rate limit exceeded for dso: retry in ")
            assert a == b
        assert [a.status for a in answers[0]] == [202, 422, 200, 429, 429, 429]
        assert answers[0][3].json["error"] == "rate_limited"
        assert dict(answers[0][3].headers)["retry-after"]
        assert await rejected(hubs[0]) == await rejected(hubs[1])
        assert hubs[0].app.state.lean_answered == {"POST /v1/emergencies": 1, "GET /v1/requests/{request_id}": 1}


async def test_a_body_nested_past_the_lean_bound_goes_to_fastapi(
        request: pytest.FixtureRequest, tmp_path: Path, mosquitto_factory: MosquittoFactory) -> None:
    """A value nested deeper than ``NESTING_MAX`` under a key repeated later (the last one wins: the model accepts the
    body) is FastAPI's to answer. Python's JSON parser counts nesting against the recursion limit, which FastAPI's
    deeper stack meets sooner: ~970 levels were a 400 through FastAPI and a 202 on the lean path (review of
    s11-http). Here 40 levels, which both parse: the same 202 from both, and the lean path did not answer it."""
    deep = "[" * 40 + "]" * 40
    steps = [post("/v1/emergencies", '{"client_ids": ' + deep + ", " + json.dumps(good_body("/v1/emergencies"))[1:])]
    async with two_hubs(request, tmp_path, mosquitto_factory) as (lean, full):
        answers = [await replay(hub, steps, [], 1) for hub in (lean, full)]
        assert answers[0] == answers[1] and answers[0][0].status == 202
        assert not lean.app.state.lean_answered


async def test_a_token_revoked_while_the_body_arrives_is_refused_alike(
        request: pytest.FixtureRequest, tmp_path: Path, mosquitto_factory: MosquittoFactory) -> None:
    """FastAPI checks the bearer token once the body is in. The lean path looked at it before reading the body, so a
    token revoked while a chunked body was still arriving created the request there (202) and was refused by FastAPI
    (401; review of s11-http). Now both refuse it, and the lean path hands it over."""
    content = json.dumps(good_body("/v1/emergencies")).encode()
    async with two_hubs(request, tmp_path, mosquitto_factory) as (lean, full):
        answers = []
        for hub, folder in ((lean, "lean"), (full, "full")):
            book = TokenBook(tmp_path / folder / "tokens.json")

            async def revoking(book: TokenBook = book) -> AsyncIterator[bytes]:
                yield content[:10]
                # The hub runs on this loop: a pause lets it read the headers and the first chunk (nothing tells when
                # it has, and the client writes both chunks at once without it).
                await asyncio.sleep(0.5)
                book.revoke("dso")  # every DSO token of this hub, the one of this request too
                yield content[10:]

            r = await hub.http.post("/v1/emergencies", content=revoking(), headers={
                "Authorization": f"Bearer {hub.tokens['dso']}", "Content-Type": "application/json"})
            answers.append((r.status_code, r.json()))
        assert answers[0] == answers[1] and answers[0][0] == 401, answers
        assert not lean.app.state.lean_answered


async def test_the_lean_path_looks_at_the_token_file_once_per_request(
        request: pytest.FixtureRequest, tmp_path: Path, mosquitto_factory: MosquittoFactory,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each look at the token file is an ``os.stat`` (and a hash of the token) on the hub's loop, for every HTTP
    request (revocation at once). The lean path looked twice per POST: before reading the body and, as FastAPI
    does, once it was in; now only once it is in (the look that refuses a token revoked while the body arrived, the
    test above). A GET, which has no body, is looked at once, as before."""
    async with contextlib.asynccontextmanager(running_hub)(request, tmp_path, mosquitto_factory, "sqlite",
                                                           lean=True) as hub:
        await hub.setup_registry({"c1": "r1", "c2": "r2"})
        book = hub.app.state.tokens
        looks: list[str] = []
        look = book.principal

        def counted(token: str) -> Any:
            looks.append(token)
            return look(token)

        monkeypatch.setattr(book, "principal", counted)
        r = await hub.http.post("/v1/emergencies", json=good_body("/v1/emergencies"),
                                headers=hub.auth("dso"))
        assert r.status_code == 202, r.text
        assert looks == [hub.tokens["dso"]]
        r = await hub.http.get(f"/v1/requests/{r.json()['request_id']}", headers=hub.auth("dso"))
        assert r.status_code == 200, r.text
        assert looks == [hub.tokens["dso"]] * 2
        assert hub.app.state.lean_answered == {"POST /v1/emergencies": 1, "GET /v1/requests/{request_id}": 1}
