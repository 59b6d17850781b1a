"""The shared outbox round and inbound router of ``mhp_wire``, driven by an injected clock: no sleeps.

The outbox's storage here is an in-memory implementation of :class:`OutboxStorage` (the hub's book is one too);
the hub's, bridge's and gateway's own storages run through it in their own tests and the fault tests."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from mhp_wire import topics
from mhp_wire.messages import Ack, ErrorReply, Outcome, Presence, Telemetry, encode
from mhp_wire.mqtt import MqttError
from mhp_wire.outbox import Outbox, Pending
from mhp_wire.ratelimit import RateLimiter
from mhp_wire.router import TOPICS_KEPT, Inbound, InboundRouter, Refusal


class Clock:
    def __init__(self) -> None:
        self.t = 10_000.0

    def __call__(self) -> float:
        return self.t


class Table:
    """msg_id → [payload, attempts, next_at]; acked ids are deleted (ack → drop)."""

    def __init__(self, ids: list[str]) -> None:
        self.rows = {m: [m.encode(), 0, 0.0] for m in ids}
        self.dropped: list[str] = []

    async def due(self, now: float, limit: int) -> list[Pending]:
        due = [(m, r) for m, r in self.rows.items() if r[2] <= now][:limit]
        return [Pending(m, f"t/{m}", bytes(r[0]), int(r[1]), row=m) for m, r in due]

    async def sent(self, sent: Sequence[tuple[Pending, float]], dropped: Sequence[Pending], now: float) -> None:
        for p, at in sent:
            row = self.rows[str(p.key)]
            row[1] = int(row[1]) + 1
            row[2] = at
        for p in dropped:
            self.dropped.append(str(p.key))
            del self.rows[str(p.key)]

    def ack(self, ids: list[str]) -> None:
        for m in ids:
            self.rows.pop(m, None)


async def test_outbox_sends_resends_on_the_back_off_until_acked_then_drops() -> None:
    clock, table = Clock(), Table(["a", "b", "c"])
    wire: list[tuple[float, str]] = []
    link_up = True

    async def publish(topic: str, payload: bytes, retain: bool) -> None:
        if not link_up:
            raise MqttError("down")
        wire.append((clock(), payload.decode()))

    box = Outbox(table, publish, clock=clock, resend_from="read")
    assert await box.send_due() == 3 and [m for _, m in wire] == ["a", "b", "c"]
    assert await box.send_due() == 0  # nothing is due before its back-off
    table.ack(["b"])
    clock.t += 0.5  # the first re-send after 0.5 s, the next after 1 s, then 2 s ...
    assert await box.send_due() == 2 and [m for _, m in wire[3:]] == ["a", "c"]
    clock.t += 0.9
    assert await box.send_due() == 0
    clock.t += 0.1
    link_up = False  # a round that cannot publish changes nothing: still due, no attempt counted
    assert await box.send_due() == 0 and table.rows["a"][1] == 2
    link_up = True
    assert await box.send_due() == 2 and table.rows["a"][1] == 3 and table.rows["a"][2] == clock.t + 2.0
    table.ack(["a", "c"])
    clock.t += 3600
    assert await box.send_due() == 0 and table.rows == {} and box.sends == 7


async def test_outbox_round_stops_at_the_first_failed_publish_and_applies_the_owners_rule() -> None:
    clock, table = Clock(), Table(["a", "old", "b", "c"])
    wire: list[str] = []

    async def publish(topic: str, payload: bytes, retain: bool) -> None:
        if payload == b"c":
            raise MqttError("in-flight window stayed full")
        wire.append(payload.decode())

    async def check(p: Pending) -> bool:
        assert box.round_at == clock.t
        return p.key != "old"  # the owner's rule: past its deadline, dropped instead of sent

    box = Outbox(table, publish, clock=clock, retry_s=lambda n: 5.0 * n)
    assert await box.send_due(check) == 2 and wire == ["a", "b"]
    assert table.dropped == ["old"] and table.rows["c"][1] == 0 and table.rows["c"][2] == 0.0  # c: still due
    assert table.rows["a"][2] == clock.t + 5.0  # the owner's own delays, from the end of the round


def _router(limiter: RateLimiter | None = None) -> tuple[InboundRouter, list[tuple[str, str]]]:
    seen: list[tuple[str, str]] = []

    async def handler(source: Inbound, msg: object) -> None:
        seen.append((source.party_id, type(msg).__name__ + ":" + source.channel))

    async def presence(source: Inbound, msg: Presence) -> None:
        seen.append((source.party_id, "presence:" + msg.state))

    async def refused(r: Refusal) -> None:
        seen.append((str(r.party_id), "refused:" + r.reason))

    router = InboundRouter("gateways", {Ack: handler, Outcome: handler, Telemetry: handler}, on_refused=refused,
                           limiter=None if limiter is None else (lambda: limiter), on_presence=presence,
                           on_decoded=lambda m: seen.append(("decoded", m.type)))
    return router, seen


ACK = encode(Ack(ack_ids=["m1"]))


@pytest.mark.parametrize(("topic", "payload", "expected"), [
    (topics.up("gateways", "gw-1"), ACK, [("decoded", "ack"), ("gw-1", "Ack:msg")]),
    (topics.status("gateways", "gw-1"), encode(Presence(state="online")),
     [("decoded", "presence"), ("gw-1", "presence:online")]),
    (topics.status("gateways", "gw-1"), ACK, [("decoded", "ack")]),  # only presence counts on the status channel
    (topics.up("gateways", "gw-1"), encode(Presence(state="online")),
     [("decoded", "presence"), ("gw-1", "refused:unexpected")]),
    (topics.up("gateways", "gw-1"), encode(ErrorReply(code="invalid", message="x")),
     [("decoded", "error"), ("gw-1", "refused:unexpected")]),  # not registered: not taken
    (topics.up("gateways", "gw-1"), b"{not json", [("gw-1", "refused:invalid")]),
    (topics.up("retailers", "r1"), ACK, [("r1", "refused:kind")]),
    ("mhp/v1/gateways/gw-1/up/other", ACK, [("gw-1", "refused:topic")]),
    ("elsewhere", ACK, [("None", "refused:topic")]),
])
async def test_router_table(topic: str, payload: bytes, expected: list[tuple[str, str]]) -> None:
    router, seen = _router()
    await router.route(topic, payload, False)
    assert seen == expected


async def test_router_rate_limits_per_party_before_decoding() -> None:
    clock = Clock()
    router, seen = _router(RateLimiter(1.0, 2, clock=clock))
    for _ in range(3):
        await router.route(topics.up("gateways", "gw-1"), b"{not even json", False)
    await router.route(topics.up("gateways", "gw-2"), ACK, False)
    assert seen == [("gw-1", "refused:invalid"), ("gw-1", "refused:invalid"), ("gw-1", "refused:rate_limited"),
                    ("decoded", "ack"), ("gw-2", "Ack:msg")]
    clock.t += 1.0  # one token back
    await router.route(topics.up("gateways", "gw-1"), ACK, False)
    assert seen[-1] == ("gw-1", "Ack:msg")


async def test_type_table_hands_each_type_to_its_handler_and_says_when_none_takes_it() -> None:
    from mhp_wire.router import TypeTable

    got: list[str] = []

    async def on_ack(msg: Ack) -> None:
        got.append("ack:" + ",".join(msg.ack_ids))

    table = TypeTable({Ack: on_ack})
    assert await table.dispatch(Ack(ack_ids=["m1", "m2"])) is True
    assert await table.dispatch(Presence(state="online")) is False
    assert got == ["ack:m1,m2"]


async def test_router_parses_each_topic_once_and_refuses_a_bad_one_every_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 14, session 13: a party's topic is parsed once, not per message; a refused topic is not kept, so it is
    refused again each time; each party is still told apart; a full cache starts over (:data:`TOPICS_KEPT`)."""
    parsed: list[str] = []
    parse_up = topics.parse_up

    def counted(topic: str) -> topics.ParsedTopic:
        parsed.append(topic)
        return parse_up(topic)

    monkeypatch.setattr(topics, "parse_up", counted)
    router, seen = _router()
    for party in ("gw-1", "gw-2", "gw-1", "gw-2"):
        await router.route(topics.up("gateways", party), ACK, False)
    for _ in range(2):
        await router.route("mhp/v1/gateways/gw-1/up/other", ACK, False)
    assert seen == [("decoded", "ack"), ("gw-1", "Ack:msg"), ("decoded", "ack"), ("gw-2", "Ack:msg")] * 2 \
        + [("gw-1", "refused:topic")] * 2
    assert parsed == [topics.up("gateways", "gw-1"), topics.up("gateways", "gw-2")] \
        + ["mhp/v1/gateways/gw-1/up/other"] * 2
    monkeypatch.setattr("mhp_wire.router.TOPICS_KEPT", 2)  # full: the next new topic starts it over
    await router.route(topics.up("gateways", "gw-3"), ACK, False)
    await router.route(topics.up("gateways", "gw-1"), ACK, False)
    assert parsed[-2:] == [topics.up("gateways", "gw-3"), topics.up("gateways", "gw-1")]
    assert seen[-2:] == [("decoded", "ack"), ("gw-1", "Ack:msg")] and TOPICS_KEPT == 65_536
