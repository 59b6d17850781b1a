"""A message the link refuses as over the broker's packet (``PacketTooLarge``, nothing written) is parked, not
recorded as sent. On e3ac111 the outbox passed parked messages to ``OutboxStorage.sent`` like real sends: the bridge
recorded a first send (first_sent_at, handling_ms, attempts) of a command never written and, after ``park_s``,
told the hub its gateway was ``unreachable`` ("no acknowledgement"), though the gateway was never sent anything.
Now the outbox hands them to ``OutboxStorage.parked``, and the bridge closes such a command as ``refused`` with the
size as its reason (docs/decisions.md, "A link refuses a packet over the broker's limit")."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mhp_wire.messages import ClientState, Outcome, decode
from mhp_wire.mqtt import PacketTooLarge
from mhp_wire.outbox import Outbox, Pending
from retailer_bridge.relay import BridgeRelay
from retailer_bridge.store import CLOSED, BridgeStore, NewCommand
from tests.retailer_bridge.test_bridge_command_templates import template
from tests.retailer_bridge.test_bridge_resend_queued_burst import Clock


class Storage:
    def __init__(self) -> None:
        self.recorded: list[tuple[list[str], list[str]]] = []
        self.kept: list[tuple[str, float, int]] = []

    async def due(self, now: float, limit: int) -> list[Pending]:
        return [Pending("big", "t", b"x", 0), Pending("small", "t", b"y", 0)]

    async def sent(self, sent: Sequence[tuple[Pending, float]], dropped: Sequence[Pending], now: float) -> None:
        self.recorded.append(([str(p.key) for p, _ in sent], [str(p.key) for p in dropped]))

    async def parked(self, parked: Sequence[tuple[Pending, float, PacketTooLarge]], now: float) -> None:
        self.kept += [(str(p.key), at, exc.size) for p, at, exc in parked]


async def test_an_outbox_hands_a_parked_message_to_its_storage_as_parked_not_as_sent() -> None:
    async def publish(topic: str, payload: bytes, retain: bool) -> None:
        if payload == b"x":
            raise PacketTooLarge(topic, 300_000, 262_144)

    storage = Storage()
    out = Outbox(storage, publish, clock=lambda: 100.0)
    assert await out.send_due() == 1
    assert storage.recorded == [(["small"], [])], storage.recorded  # e3ac111: [(['small', 'big'], [])]
    assert storage.kept == [("big", 100.0 + out.park_s, 300_000)] and out.parked == 1


class RefusingLink:
    connected = True

    async def publish(self, topic: str, payload: bytes, **_: object) -> None:
        raise PacketTooLarge(topic, 300_000, 262_144)


async def test_a_command_too_large_to_send_is_closed_refused_for_its_size_not_unreachable(tmp_path: Path) -> None:
    store = BridgeStore(tmp_path / "b.db")
    await store.open()
    try:
        clock = Clock(1_000_000.0)
        relay = BridgeRelay("r1", {"c1": "gw-1"}, store)
        relay.commands_out.clock = clock
        relay.local = RefusingLink()  # type: ignore[assignment]
        relay.local_connected()
        await store.accept_request([NewCommand("q", "c1", "gw-1", "cmd1", b"command", clock.t, clock.t + 7200)], [])
        await relay.dispatch_gateways()
        row = (await store.commands_of("q"))[0]
        # e3ac111: attempts 1, first_sent_at set, and after park_s "unreachable: no acknowledgement ... in time".
        assert row["first_sent_at"] is None and row["attempts"] == 0 and row["state"] == CLOSED, row
        [queued] = await store.due_outbox(clock.t + 1)
        outcome = decode(queued["payload"])
        assert isinstance(outcome, Outcome) and outcome.state is ClientState.REFUSED
        assert outcome.client_id == "c1" and "300000 bytes" in str(outcome.detail["reason"])
        clock.t += relay.commands_out.park_s + 1
        await relay.dispatch_gateways()
        assert (await store.commands_of("q"))[0] == row  # closed: never sent, never judged again
        assert len(await store.due_outbox(clock.t + 1)) == 1
    finally:
        await store.close()


class RecordingLink:
    connected = True

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    async def publish(self, topic: str, payload: bytes, **_: object) -> None:
        self.sent.append((topic, payload))


def _relay_to_two_gateways(store: BridgeStore) -> tuple[Clock, BridgeRelay, RecordingLink]:
    """A relay for clients c1 and c2 (gateways gw-1, gw-2) on ``store``, its clock injected, its link up and
    recording what it publishes."""
    clock = Clock(1_000_000.0)
    relay = BridgeRelay("r1", {"c1": "gw-1", "c2": "gw-2"}, store)
    relay.commands_out.clock = clock
    link = RecordingLink()
    relay.local = link  # type: ignore[assignment]
    relay.local_connected()
    return clock, relay, link


async def test_a_due_command_without_its_payload_is_closed_refused_not_due_for_ever(tmp_path: Path) -> None:
    """Review of the thirteenth round: a command whose ``command_payloads`` row is missing (the store's invariant
    broken: a damaged database) was hidden from ``due_commands`` by its join while ``next_gateway_due`` reported it
    due: the dispatcher woke for it for ever and sent nothing. It is now read (its payload None) and closed as
    ``refused``, its outcome for the hub; the other commands go out. On e44a65f this fails: the command stays
    ``sending``, no outcome, and it is still due."""
    store = BridgeStore(tmp_path / "b.db")
    await store.open()
    try:
        clock, relay, link = _relay_to_two_gateways(store)
        await store.accept_request([NewCommand("q", c, f"gw-{c[1]}", f"cmd-{c}", b"command", clock.t, clock.t + 7200)
                                    for c in ("c1", "c2")], [])
        await store.sql.tx(lambda db: db.execute("DELETE FROM command_payloads WHERE client_id='c1'"))
        await relay.dispatch_gateways()
        assert [p for _, p in link.sent] == [b"command"]  # c2's
        rows = {c["client_id"]: c for c in await store.commands_of("q")}
        assert rows["c1"]["state"] == CLOSED and rows["c1"]["attempts"] == 0, rows["c1"]
        [queued] = await store.due_outbox(clock.t + 1)
        outcome = decode(queued["payload"])
        assert isinstance(outcome, Outcome) and outcome.state is ClientState.REFUSED and outcome.client_id == "c1"
        assert "payload is missing" in str(outcome.detail["reason"])
        assert all(c["msg_id"] != "cmd-c1" for c in await store.due_commands(clock.t + 10_000))
    finally:
        await store.close()


async def test_a_template_made_command_whose_template_is_lost_is_closed_refused(tmp_path: Path) -> None:
    """Review of the fourteenth round: the same for a command made from its message's template (layout 2), whose
    ``command_templates`` row is missing: its payload reads as None and it is closed as ``refused`` with its outcome
    for the hub, not sent and not due for ever."""
    store = BridgeStore(tmp_path / "b.db")
    await store.open()
    try:
        clock, relay, link = _relay_to_two_gateways(store)
        t = template()
        assert t.parts is not None
        made = [NewCommand("q", c, f"gw-{c[1]}", f"cmd-{c}", t.payload(f"cmd-{c}", c), clock.t, clock.t + 7200)
                for c in ("c1", "c2")]
        await store.accept_request(made, [], t.parts)
        assert await store.sql.read(lambda db: db.execute("SELECT COUNT(*) FROM command_payloads").fetchone()[0]) == 0
        await store.sql.tx(lambda db: db.execute("DELETE FROM command_templates"))
        await relay.dispatch_gateways()
        assert link.sent == []
        rows = await store.commands_of("q")
        assert {r["state"] for r in rows} == {CLOSED} and {r["attempts"] for r in rows} == {0}, rows
        outcomes = [decode(q["payload"]) for q in await store.due_outbox(clock.t + 1)]
        assert sorted(o.client_id for o in outcomes if isinstance(o, Outcome) and o.state is ClientState.REFUSED) \
            == ["c1", "c2"]
        assert await store.due_commands(clock.t + 10_000) == []
    finally:
        await store.close()
