"""A gateway's outcome near the size limit reaches the hub with its state, and nothing is cut or sent for ever
(issue 14 follow-up, "loses nothing"; docs/decisions.md, "A message that fits the brokers' packet").

The brokers take a whole PUBLISH packet of at most 256 KiB (``max_packet_size``, topic and headers included) and
disconnect a client that sends a larger one; its session sends the QoS 1 packet again at each reconnection. Before,
a gateway's outcome that fitted its retailer broker grew past the hub broker's packet once the bridge added its trace
(``gateway_rtt_ms``, ``retailer_ms``): the hub broker cut the bridge's link every second, for good, and no outcome
of that retailer reached the hub again; a batch of outcomes was split at 256 KiB of payload, so one just under it
did not fit the packet either; a gateway's own outcome over the packet cut the gateway's link the same way.

Through real parts: the hub (uvicorn, real SQLite) and its Mosquitto, retailer r1's bridge and its Mosquitto, the
gateways played by paho parties (the end-to-end test), the bridge's packing published through a real hub broker
(the batch test); the gateway's side is ``tests/hems_firmware/test_outcome_limit.py``. The new limits are read as
``messages.X`` after the point each test failed at before, so that the tests run (and fail) on the commit before
them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from broker_config.render import BrokerSpec
from mhp_wire import messages, topics
from mhp_wire.fastwire import Report, outcomes_payload
from mhp_wire.messages import (
    MAX_PAYLOAD_BYTES,
    Ack,
    ClientState,
    Command,
    Measurement,
    Outcome,
    Outcomes,
    decode,
    encode,
)
from retailer_bridge.relay import pack_outcomes
from retailer_bridge.service import Bridge
from tests.broker_fixtures import BrokerHandle, MosquittoFactory
from tests.cloud_hub.test_relay import metric, post_emergency, wait_state
from tests.hub_fixtures import HubHandle
from tests.mqtt_party import Party, parties
from tests.test_late_outcome_after_unreachable import bridge  # noqa: F401  (the fixture, used by name below)
from tests.waiting import eventually

PACKET = BrokerSpec.__dataclass_fields__["max_packet_size"].default
"""The brokers' ``max_packet_size`` as ``broker_config`` writes it (256 KiB)."""


def packet_room(topic: str) -> int:
    """The largest payload whose QoS 1 PUBLISH on ``topic`` fits :data:`PACKET`: the fixed header (1), the remaining
    length (3 bytes at this size), the topic with its length (2), the packet id (2), the empty properties (1)."""
    return PACKET - (1 + 3 + 2 + len(topic.encode()) + 2 + 1)


def sized(out: Outcome, size: int) -> Outcome:
    """``out`` with its detail's ``log`` padded so that its payload is ``size`` bytes."""
    base = out.model_copy(update={"detail": {**out.detail, "log": ""}})
    return base.model_copy(update={"detail": {**base.detail, "log": "x" * (size - len(encode(base)))}})


async def test_an_outcome_the_bridges_trace_pushes_past_the_hub_brokers_packet_reaches_the_hub_with_its_state(
        hub: HubHandle, bridge: tuple[Bridge, BrokerHandle]) -> None:  # noqa: F811  (the fixture)
    b, local = bridge
    relay = b.relay
    with parties(Party(local, "gw-1", topics.down("gateways", "gw-1")),
                 Party(local, "gw-2", topics.down("gateways", "gw-2"))) as (gw1, gw2):
        request_id = await post_emergency(hub, ["c1", "c2"], lead_s=1)
        cmd1, cmd2 = await gw1.next("command"), await gw2.next("command")
        assert isinstance(cmd1, Command) and isinstance(cmd2, Command)
        # gw-1: the largest outcome its retailer broker takes (a gateway other than ours may send it).
        up1 = topics.up("gateways", "gw-1")
        big = sized(Outcome(request_id=request_id, client_id="c1", state=ClientState.EXECUTED,
                            detail={"limit_kw": 1.0, "shed": ["water-heater"], "reason": "held under 1 kW"},
                            revision=cmd1.revision), packet_room(up1))
        await gw1.publish(up1, Ack(ack_ids=[cmd1.msg_id]))
        await gw1.publish(up1, big)
        ack = await gw1.next("ack")
        assert isinstance(ack, Ack) and big.msg_id in ack.ack_ids  # taken: its gateway does not send it again
        # gw-2, after it: an ordinary outcome, which waited behind the cut link for ever before.
        await gw2.publish(topics.up("gateways", "gw-2"), Ack(ack_ids=[cmd2.msg_id]))
        await gw2.publish(topics.up("gateways", "gw-2"), Outcome(
            request_id=request_id, client_id="c2", state=ClientState.EXECUTED, detail={"shed": ["ev"]},
            revision=cmd2.revision))
        req = await wait_state(hub, request_id, "completed", timeout=20)
    # The DSO's view: every client's outcome, c1's state with what of its detail fits.
    assert req["state"] == "completed", req["clients"]  # before: "dispatching", both clients "delivered", for ever
    c1, c2 = req["clients"]["c1"], req["clients"]["c2"]
    assert c1["state"] == "executed" and c2["state"] == "executed" and c2["detail"] == {"shed": ["ev"]}
    marker = c1["detail"].pop(messages.OVERSIZE_KEY)
    assert c1["detail"] == {"limit_kw": 1.0, "reason": "held under 1 kW"}, "its small fields are kept"
    assert marker["by"] == "bridge" and marker["dropped"] == ["shed", "log"]
    assert marker["limit"] == messages.BRIDGE_OUTCOME_BYTES < marker["bytes"] <= len(encode(big)) + 200
    # Counted and logged once; nothing is left to send; the bridge's link to the hub broker was never cut.
    assert relay.rejected["gateway_detail_oversize"] == 1
    await eventually(lambda: _hub_outbox_empty(b), "the bridge's outbox to the hub is empty")
    assert relay.hub is not None and relay.hub.stats.connects == 1
    assert "oversize packet" not in hub.broker.process.log_tail()
    assert metric((await hub.http.get("/metrics")).text, "mhp_mqtt_rejected_total", reason="invalid") == 0


async def test_the_largest_outcome_a_gateway_sends_is_forwarded_whole(
        hub: HubHandle, bridge: tuple[Bridge, BrokerHandle]) -> None:  # noqa: F811  (the fixture)
    """The gateway's limit leaves room for what its bridge adds: an outcome of ``GATEWAY_OUTCOME_BYTES`` reaches the
    hub whole, its bridge's trace included."""
    b, local = bridge
    with parties(Party(local, "gw-1", topics.down("gateways", "gw-1"))) as (gw1,):
        request_id = await post_emergency(hub, ["c1"], lead_s=1)
        cmd = await gw1.next("command")
        assert isinstance(cmd, Command)
        out = sized(Outcome(request_id=request_id, client_id="c1", state=ClientState.EXECUTED,
                            detail={"limit_kw": 1.0}, trace={"gateway_ms": 3.0}, revision=cmd.revision),
                    messages.GATEWAY_OUTCOME_BYTES)
        await gw1.publish(topics.up("gateways", "gw-1"), out)
        req = await wait_state(hub, request_id, "completed", timeout=20)
    c1 = req["clients"]["c1"]
    assert c1["state"] == "executed" and c1["detail"] == out.detail, "forwarded whole"
    assert b.relay.rejected["gateway_detail_oversize"] == 0


async def test_a_batch_of_outcomes_is_split_so_that_each_packet_fits_the_hub_broker(
        mosquitto_factory: MosquittoFactory) -> None:
    """Four clients' outcomes of one request come to just under 256 KiB in one ``outcomes`` message: under the wire's
    old limit, over the packet's room on the retailer's topic. The bridge's packing splits them, and every message
    passes the hub broker (before: one message, whose packet the broker refused by cutting the bridge's link)."""
    def report(i: int, pad: int) -> Report:
        return Report("q-1", f"c{i}", ClientState.EXECUTED, {"log": "x" * pad}, {"retailer_ms": 1.5}, 1)

    empty = len(outcomes_payload("q-1", [report(i, 0) for i in range(4)])[1])
    target = MAX_PAYLOAD_BYTES - 16  # msg ids from a counter may grow by a character meanwhile
    pad = (target - empty) // 4
    reports = [report(i, pad) for i in range(4)]
    up = topics.up("retailers", "r1")
    assert packet_room(up) < len(outcomes_payload("q-1", reports)[1]) <= MAX_PAYLOAD_BYTES
    packed = pack_outcomes(reports)
    broker = mosquitto_factory("hub", ["r1"], "hub")
    with parties(Party(broker, "hub", topics.all_up("retailers")), Party(broker, "r1")) as (hub, r1):
        for _, payload in packed:
            await r1.publish(up, payload)
        got = [decode((await hub.raw()).payload) for _ in packed]  # before: nothing came, r1 was disconnected
    clients = [r["client_id"] if isinstance(r, dict) else r.client_id
               for m in got for r in (m.reports if isinstance(m, Outcomes) else [m])]
    assert sorted(clients) == ["c0", "c1", "c2", "c3"] and len(packed) > 1
    assert all(len(p) <= messages.SEND_PAYLOAD_BYTES for _, p in packed)
    assert "oversize packet" not in broker.process.log_tail()


async def _hub_outbox_empty(b: Bridge) -> bool:
    return (await b.store.counts()).get("hub_outbox") == 0


async def test_measurements_of_many_clients_go_in_messages_that_fit_the_packet_and_none_is_dropped(
        hub: HubHandle, bridge: tuple[Bridge, BrokerHandle]) -> None:  # noqa: F811  (the fixture)
    """12,000 measurements waiting at one flush (a bridge of ~3,200 gateways or more reporting every 5 s, or its
    backlog): before, the bridge kept the first 10,000 and dropped the rest unsaid, and encoded them in one message of
    ~800 KB, which the hub broker refused by cutting the bridge's link, again at each reconnection, for good (and every
    outcome of r1 behind it). Now they go in as many messages as fit the packet, and the hub stores every one.

    The measurements are put where the bridge's telemetry handler puts them (its gateways' telemetry is
    rate-limited per gateway, and two gateways cannot send 12,000 in one flush); from there on every part is real."""
    b, _ = bridge
    now = datetime.now(UTC)
    items = {(c, i): Measurement(client_id=c, at=now - timedelta(milliseconds=i), active_power_kw=i / 1000)
             for i in range(6_000) for c in ("c1", "c2")}
    b.relay._pending_measurements.update(items)
    async def flushed_and_taken() -> bool:  # the flush comes within the bridge's measurement interval (5 s)
        return not b.relay._pending_measurements and await _hub_outbox_empty(b)

    await eventually(flushed_and_taken, "the measurements were sent and the hub took them", timeout_s=30)
    assert b.relay.hub is not None and b.relay.hub.stats.connects == 1
    assert "oversize packet" not in hub.broker.process.log_tail()
    window = {"from": (now - timedelta(seconds=10)).isoformat(), "to": (now + timedelta(seconds=1)).isoformat()}
    for client in ("c1", "c2"):
        got = (await hub.http.get("/v1/measurements", params={"client_id": client, **window},
                                  headers=hub.auth("dso"))).json()
        assert len(got["series"]) == 6_000, client  # before: none (the link was cut before the message passed)
    sizes = [len(p) for _, p in messages.measurements_payloads(list(items.values()))]
    assert len(sizes) > 1 and max(sizes) <= messages.SEND_PAYLOAD_BYTES
