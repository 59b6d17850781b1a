"""The RP simulator answers as the real bridge does: ``outcomes`` batches (clients whose delays fall in one window
share a message, at most ``OUTCOMES_MAX``), each acknowledged and re-sent as one message, every client answered
once; ``--outcomes per-client`` keeps the paper's one ``outcome`` per client. Through a real Mosquitto and a real
hub, and with the test as the hub (to withhold acks and deliver a request twice)."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mhp_wire import topics
from mhp_wire.messages import (
    OUTCOMES_MAX,
    Ack,
    ClientState,
    EmergencyParams,
    Outcome,
    Outcomes,
    Request,
    RequestKind,
    encode,
)
from mhp_wire.mqtt import MqttEndpoint
from sim.experiment import rp_sim
from sim.experiment.rp_sim import RpSimulator, run
from tests.broker_fixtures import BrokerHandle, MosquittoFactory
from tests.cloud_hub.test_relay import metric, post_emergency, wait_state
from tests.hub_fixtures import HubHandle
from tests.mqtt_party import Party, parties


@contextlib.asynccontextmanager
async def simulator(broker: BrokerHandle, **kwargs: object) -> AsyncIterator[RpSimulator]:
    """One RP simulator for ``r1`` on ``broker``, connected and subscribed (its ready file written), served until
    the block ends."""
    sim = RpSimulator("r1", MqttEndpoint(broker.host, broker.port, "r1", broker.identities["r1"].password),
                      seed=7, **kwargs)  # type: ignore[arg-type]
    stop = asyncio.Event()
    with tempfile.TemporaryDirectory() as tmp:
        ready = Path(tmp) / "rp.ready"
        task = asyncio.create_task(run([sim], ready, stop))
        try:
            await until(ready.exists)
            yield sim
        finally:
            stop.set()
            await task


async def until(check: object, timeout: float = 15.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if check():  # type: ignore[operator]
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached")


@pytest.mark.parametrize(("mode", "messages"), [("batches", 1), ("per-client", 150)])
async def test_a_request_is_answered_in_one_outcomes_batch_or_one_outcome_per_client(
        hub: HubHandle, mode: str, messages: int) -> None:
    clients = [f"c{i:03d}" for i in range(150)]
    await hub.setup_registry(dict.fromkeys(clients, "r1"))
    async with simulator(hub.broker, delay_min_ms=5, delay_max_ms=10, outcomes=mode) as sim:
        request_id = await post_emergency(hub, clients)
        req = await wait_state(hub, request_id, "completed", timeout=15)
        assert {c: v["state"] for c, v in req["clients"].items()} == dict.fromkeys(clients, "executed")
        await until(lambda: not sim.unacked)
        st = sim.stats
        assert (st.outcomes, st.outcome_messages, st.outcomes_acked) == (150, messages, 150)
        assert st.errors_from_hub == 0
        text = (await hub.http.get("/metrics")).text
        batched = metric(text, "mhp_mqtt_received_total", type="outcomes")
        single = metric(text, "mhp_mqtt_received_total", type="outcome")
        assert (batched, single) == ((1, 0) if mode == "batches" else (0, 150))


async def test_delays_in_separate_windows_go_in_separate_messages_each_client_once(hub: HubHandle) -> None:
    clients = [f"c{i:03d}" for i in range(200)]
    await hub.setup_registry(dict.fromkeys(clients, "r1"))
    # Delays spread over 0-400 ms, windows of 20 ms: about 20 messages, none holding a client twice.
    async with simulator(hub.broker, delay_min_ms=0, delay_max_ms=400, batch_window_ms=20) as sim:
        request_id = await post_emergency(hub, clients)
        await wait_state(hub, request_id, "completed", timeout=15)
        await until(lambda: not sim.unacked)
        st = sim.stats
        assert st.outcomes == st.outcomes_acked == 200
        assert 10 <= st.outcome_messages <= 40, st.outcome_messages
        text = (await hub.http.get("/metrics")).text
        assert (metric(text, "mhp_mqtt_received_total", type="outcomes")
                + metric(text, "mhp_mqtt_received_total", type="outcome")) == st.outcome_messages


def request_for(clients: list[str]) -> Request:
    start = datetime.now(UTC) + timedelta(seconds=30)
    return Request(request_id="req-1", kind=RequestKind.EMERGENCY, client_ids=clients,
                   params=EmergencyParams(start=start, end=start + timedelta(minutes=5), power_limit_kw=1.0),
                   expires_at=start + timedelta(minutes=5))


async def test_a_batch_is_resent_whole_until_acked_and_a_request_delivered_again_is_answered_once(
        mosquitto_factory: MosquittoFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rp_sim, "RESEND_QUIET_S", 0.2)  # the re-send's hold-back, shortened for the test
    broker = mosquitto_factory("hub", ["r1"], "hub")
    clients = [f"c{i:03d}" for i in range(30)]
    with parties(Party(broker, "hub", topics.up("retailers", "r1"))) as (hub,):
        async with simulator(broker, delay_min_ms=5, delay_max_ms=10) as sim:
            req = request_for(clients)
            down = topics.down("retailers", "r1")
            await hub.publish(down, req)
            ack = await hub.next("ack")
            assert isinstance(ack, Ack) and ack.ack_ids == [req.msg_id]
            first = await hub.next("outcomes")
            assert isinstance(first, Outcomes) and first.request_id == "req-1"
            assert sorted(r.client_id for r in first.reports) == clients
            assert {r.state for r in first.reports} == {ClientState.EXECUTED}
            # Not acknowledged: the same message comes again, whole, under its own msg_id.
            again = await hub.next("outcomes", timeout=5)
            assert isinstance(again, Outcomes) and again.msg_id == first.msg_id
            assert again.reports == first.reports
            assert sim.stats.outcome_resends >= 1
            await hub.publish(down, Ack(ack_ids=[first.msg_id]))
            await until(lambda: not sim.unacked)
            assert sim.stats.outcomes_acked == 30
            # The request again (a hub that missed the ack): acked again, nobody answered twice.
            await hub.publish(down, req)
            ack = await hub.next("ack")
            assert isinstance(ack, Ack) and ack.ack_ids == [req.msg_id]
            # Nothing new comes (a re-send of the first message already on its way when the ack went may).
            with contextlib.suppress(TimeoutError):
                while True:
                    late = await hub.next(timeout=0.5)
                    assert isinstance(late, Outcomes) and late.msg_id == first.msg_id, late
            assert sim.stats.redelivered_requests == 1 and sim.stats.outcomes == 30
            assert sim.stats.outcome_messages == 1


@pytest.mark.parametrize(("delays", "window_ms", "batch_max", "sizes"), [
    ([0.0, 0.005, 0.010, 0.030, 0.031, 0.100], 20, OUTCOMES_MAX, [3, 2, 1]),
    ([0.0, 0.001, 0.002, 0.003, 0.004], 20, 2, [2, 2, 1]),
    ([0.0, 0.020, 0.0201], 20, OUTCOMES_MAX, [2, 1]),
    ([0.0, 0.001], 0, OUTCOMES_MAX, [1, 1]),
    ([], 20, OUTCOMES_MAX, []),
])
def test_windows_cut_sorted_delays_into_messages(delays: list[float], window_ms: float, batch_max: int,
                                                 sizes: list[int]) -> None:
    sim = RpSimulator("r1", MqttEndpoint("127.0.0.1", 1, "r1", "x"), batch_window_ms=window_ms)
    sim.batch_max = batch_max
    timed = [(d, f"c{i}") for i, d in enumerate(delays)]
    groups = sim.windows(timed)
    assert [len(g) for g in groups] == sizes
    assert [x for g in groups for x in g] == timed, "every client once, in delay order"


def test_a_window_over_the_payload_limit_is_split_and_one_client_goes_as_a_plain_outcome() -> None:
    clients = [f"client-{'x' * 50}-{i:05d}" for i in range(OUTCOMES_MAX)]
    msgs = RpSimulator._messages("req-1", clients, ClientState.EXECUTED, {"simulated": True}, {"retailer_ms": 1.0})
    assert len(msgs) > 1 and all(isinstance(m, Outcomes) and len(encode(m)) <= 256 * 1024 for m in msgs)
    assert [r.client_id for m in msgs if isinstance(m, Outcomes) for r in m.reports] == clients
    one = RpSimulator._messages("req-1", clients[:1], ClientState.EXECUTED, {}, {})
    assert len(one) == 1 and isinstance(one[0], Outcome) and one[0].client_id == clients[0]


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match="outcomes must be one of"):
        RpSimulator("r1", MqttEndpoint("127.0.0.1", 1, "r1", "x"), outcomes="sometimes")
    with pytest.raises(ValueError, match="batch_window_ms"):
        RpSimulator("r1", MqttEndpoint("127.0.0.1", 1, "r1", "x"), batch_window_ms=-1)
