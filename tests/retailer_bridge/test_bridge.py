"""The retailer bridge between two real brokers, with the hub and the gateways played by paho test clients."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from mhp_wire import topics
from mhp_wire.messages import (
    Ack,
    AvailabilityParams,
    BillingClient,
    BillingData,
    Cancel,
    ClientState,
    Command,
    EmergencyParams,
    ErrorReply,
    Measurements,
    Outcome,
    ReadingBlock,
    Request,
    RequestKind,
    Tariff,
    TariffPeriod,
    Telemetry,
    presence_payload,
)
from retailer_bridge.service import Bridge
from retailer_bridge.settings import BridgeSettings
from tests.broker_fixtures import BrokerHandle, MosquittoFactory
from tests.mqtt_party import Party, parties
from tests.waiting import eventually


@dataclass
class Rig:
    hub_broker: BrokerHandle
    local: BrokerHandle
    bridge: Bridge


@contextlib.asynccontextmanager
async def running_bridge(tmp_path: Path, hub_broker: BrokerHandle, local: BrokerHandle, customers: dict[str, str],
                         **settings: Any) -> AsyncIterator[Bridge]:
    """Bridge ``r1`` between these brokers (its store in ``tmp_path``, ``settings`` on top), running from when the
    hub's broker shows it online until the block ends."""
    bridge = Bridge(BridgeSettings(
        retailer_id="r1", hub_mqtt_host=hub_broker.host, hub_mqtt_port=hub_broker.port,
        hub_mqtt_password=hub_broker.identities["r1"].password, local_mqtt_host=local.host,
        local_mqtt_port=local.port, local_mqtt_password=local.identities["bridge"].password,
        db_path=tmp_path / "bridge.db", customers=customers, **settings))
    task = asyncio.create_task(bridge.run())
    with parties(Party(hub_broker, "hub", topics.status("retailers", "r1"))) as (probe,):
        await probe.next("presence")
    try:
        yield bridge
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture
async def rig(tmp_path: Path, mosquitto_factory: MosquittoFactory) -> AsyncIterator[Rig]:
    hub_broker = mosquitto_factory("hub", ["r1", "r2"], "hub")
    local = mosquitto_factory("retailer", ["gw-1", "gw-2"], "bridge")
    async with running_bridge(tmp_path, hub_broker, local, {"c1": "gw-1", "c2": "gw-2"}, gateway_ack_timeout_s=1.5,
                              measurement_interval_s=0.5) as bridge:
        await asyncio.sleep(0.3)
        yield Rig(hub_broker, local, bridge)


def request(clients: list[str], request_id: str = "q1", lead_s: float = 5) -> Request:
    start = datetime.now(UTC) + timedelta(seconds=lead_s)
    params = EmergencyParams(start=start, end=start + timedelta(minutes=5), power_limit_kw=1.0)
    return Request(request_id=request_id, kind=RequestKind.EMERGENCY, client_ids=clients, params=params,
                   expires_at=params.end)


async def test_request_is_relayed_to_the_right_gateways_and_outcomes_go_back(rig: Rig) -> None:
    with parties(Party(rig.hub_broker, "hub", topics.all_up("retailers")),
                 Party(rig.local, "gw-1", topics.down("gateways", "gw-1")),
                 Party(rig.local, "gw-2", topics.down("gateways", "gw-2"))) as (hub, gw1, gw2):
        req = request(["c1", "c2", "c9"])
        await hub.publish(topics.down("retailers", "r1"), req)
        assert (await hub.next("ack")).ack_ids == [req.msg_id]  # type: ignore[union-attr]
        refused = await hub.next("outcome")
        assert isinstance(refused, Outcome) and refused.client_id == "c9" and refused.state is ClientState.REFUSED
        await hub.publish(topics.down("retailers", "r1"), Ack(ack_ids=[refused.msg_id]))
        cmd1, cmd2 = await gw1.next("command"), await gw2.next("command")
        assert isinstance(cmd1, Command) and isinstance(cmd2, Command)
        assert (cmd1.client_id, cmd2.client_id) == ("c1", "c2")
        for gw, cmd, gid in ((gw1, cmd1, "gw-1"), (gw2, cmd2, "gw-2")):
            await gw.publish(topics.up("gateways", gid), Ack(ack_ids=[cmd.msg_id]))
        delivered = {(await hub.next("outcome")).client_id for _ in range(2)}  # type: ignore[union-attr]
        assert delivered == {"c1", "c2"}
        out = Outcome(request_id="q1", client_id="c1", state=ClientState.EXECUTED, detail={"shed": ["heater"]},
                      trace={"gateway_ms": 12.0, "waited_ms": 4000.0})
        await gw1.publish(topics.up("gateways", "gw-1"), out)
        assert (await gw1.next("ack")).ack_ids == [out.msg_id]  # type: ignore[union-attr]
        fwd = await hub.next("outcome")
        assert isinstance(fwd, Outcome) and fwd.state is ClientState.EXECUTED and fwd.client_id == "c1"
        assert fwd.detail == {"shed": ["heater"]}
        assert fwd.trace["gateway_ms"] == 12.0 and "retailer_ms" in fwd.trace and "gateway_rtt_ms" in fwd.trace
        # The same request redelivered by the hub creates no second command.
        await hub.publish(topics.down("retailers", "r1"), req)
        await hub.next("ack")
        await gw1.nothing("command", within=0.8)


async def test_a_silent_gateway_is_reported_unreachable(rig: Rig) -> None:
    with parties(Party(rig.hub_broker, "hub", topics.all_up("retailers"))) as (hub,):
        await hub.publish(topics.down("retailers", "r1"), request(["c1"], "q2", lead_s=0))
        await hub.next("ack")
        out = await hub.next("outcome", timeout=6)
        assert isinstance(out, Outcome) and out.state is ClientState.UNREACHABLE
        assert out.detail["gateway_id"] == "gw-1"


async def test_a_gateway_may_report_only_for_its_own_client_and_garbage_is_refused(rig: Rig) -> None:
    with parties(Party(rig.hub_broker, "hub", topics.all_up("retailers")),
                 Party(rig.local, "gw-2", topics.down("gateways", "gw-2"))) as (hub, gw2):
        await hub.publish(topics.down("retailers", "r1"), request(["c1"], "q3"))
        await hub.next("ack")
        forged = Outcome(request_id="q3", client_id="c1", state=ClientState.REFUSED)
        await gw2.publish(topics.up("gateways", "gw-2"), forged)
        err = await gw2.next("error")
        assert isinstance(err, ErrorReply) and err.code == "forbidden"
        await gw2.publish(topics.up("gateways", "gw-2"), b"\xff\xfe")
        err = await gw2.next("error")
        assert isinstance(err, ErrorReply) and err.code == "invalid"
        await hub.publish(topics.down("retailers", "r1"), b"[]")
        err = await hub.next("error")
        assert isinstance(err, ErrorReply) and err.code == "invalid"
        await hub.nothing("outcome", within=0.5)
        rejected = rig.bridge.relay.rejected
        assert (rejected["gateway_foreign_client"], rejected["gateway_invalid"], rejected["hub_invalid"]) == (1, 1, 1)


async def test_cancel_reaches_the_gateway_and_a_late_copy_of_the_request_is_ignored(rig: Rig) -> None:
    with parties(Party(rig.hub_broker, "hub", topics.all_up("retailers")),
                 Party(rig.local, "gw-1", topics.down("gateways", "gw-1"))) as (hub, gw1):
        req = request(["c1"], "q4")
        await hub.publish(topics.down("retailers", "r1"), req)
        await hub.next("ack")
        cmd = await gw1.next("command")
        await gw1.publish(topics.up("gateways", "gw-1"), Ack(ack_ids=[cmd.msg_id]))
        cancel = Cancel(request_id="q4", client_ids=["c1"])
        await hub.publish(topics.down("retailers", "r1"), cancel)
        assert (await hub.next("ack")).ack_ids == [cancel.msg_id]  # type: ignore[union-attr]
        notice = await gw1.next("cancel")
        assert isinstance(notice, Cancel) and notice.request_id == "q4" and notice.client_ids == ["c1"]
        again = await gw1.next("cancel", timeout=3)
        assert again.msg_id == notice.msg_id, "re-sent until the gateway acknowledges"
        await gw1.publish(topics.up("gateways", "gw-1"), Ack(ack_ids=[notice.msg_id]))
        await hub.publish(topics.down("retailers", "r1"), req)  # a redelivered copy after the cancel
        await hub.next("ack")
        await gw1.nothing("command", within=0.8)


async def test_billing_is_kept_and_the_tariff_republished_for_gateways(rig: Rig) -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    bill = BillingData(request_id="b1", period_start=start, period_end=start + timedelta(days=1), clients=[
        BillingClient(client_id="c1", period_start=start, period_end=start + timedelta(days=1), readings=[
            ReadingBlock(start=start, resolution_s=3600, values_kwh=[1.0, 2.0])])])
    tariff = Tariff(tariff_id="tou", version=3, valid_from=start, valid_to=start + timedelta(days=1), periods=[
        TariffPeriod(start=start, end=start + timedelta(hours=1), price_eur_per_kwh=0.1)])
    with parties(Party(rig.hub_broker, "hub", topics.all_up("retailers"))) as (hub,):
        await hub.publish(topics.down("retailers", "r1"), bill)
        assert (await hub.next("ack")).ack_ids == [bill.msg_id]  # type: ignore[union-attr]
        kept = await rig.bridge.store.billing_of("c1")
        assert len(kept) == 1 and '"values_kwh":[1.0,2.0]' in kept[0]["readings"].replace(" ", "")
        await hub.publish(topics.down("retailers", "r1"), tariff)
        assert (await hub.next("ack")).ack_ids == [tariff.msg_id]  # type: ignore[union-attr]
    with parties(Party(rig.local, "gw-2", topics.TARIFF)) as (gw2,):
        got = await gw2.raw()
        assert got.retain and Tariff.model_validate_json(got.payload).version == 3


async def test_availability_comes_from_gateway_telemetry_and_measurements_are_forwarded(rig: Rig) -> None:
    now = datetime.now(UTC)
    with parties(Party(rig.hub_broker, "hub", topics.all_up("retailers")),
                 Party(rig.local, "gw-1")) as (hub, gw1):
        await gw1.publish(topics.status("gateways", "gw-1"), presence_payload("online"), retain=True)
        await gw1.publish(topics.telemetry("gw-1"), Telemetry(
            gateway_id="gw-1", client_id="c1", seq=1, at=now, devices={}, active_power_kw=5.5, sheddable_kw=4.2))
        await asyncio.sleep(0.3)
        start = now + timedelta(seconds=30)
        ask = Request(request_id="a1", kind=RequestKind.AVAILABILITY, client_ids=["c1", "c2"],
                      params=AvailabilityParams(start=start, end=start + timedelta(minutes=5), reduction_kw=3),
                      expires_at=start + timedelta(minutes=5))
        await hub.publish(topics.down("retailers", "r1"), ask)
        answers = {}
        batches = []  # the measurements may come before the answers (this hub acknowledges nothing: sent once)
        while len(answers) < 2:
            msg = await hub.next()
            if isinstance(msg, Outcome):
                answers[msg.client_id] = msg
            elif isinstance(msg, Measurements):
                batches.append(msg)
        assert answers["c1"].state is ClientState.AVAILABLE and answers["c1"].detail["available_kw"] == 4.2
        assert answers["c2"].state is ClientState.UNAVAILABLE and "offline" in answers["c2"].detail["reason"]
        batch = batches[0] if batches else await hub.next("measurements", timeout=3)
        assert isinstance(batch, Measurements)
        assert [(m.client_id, m.active_power_kw) for m in batch.items] == [("c1", 5.5)]


async def test_a_gateway_that_comes_back_gets_its_command_at_once(rig: Rig) -> None:
    with parties(Party(rig.hub_broker, "hub", topics.all_up("retailers"))) as (hub,):
        await hub.publish(topics.down("retailers", "r1"), request(["c1"], "q5", lead_s=30))
        await hub.next("ack")

        def sent_twice() -> bool:  # while gw-1 was away: the next retry is seconds off
            with contextlib.closing(sqlite3.connect(f"file:{rig.bridge.settings.db_path}?mode=ro", uri=True)) as db:
                row = db.execute("SELECT attempts FROM commands WHERE request_id='q5' AND client_id='c1'").fetchone()
            return row is not None and row[0] >= 2

        await eventually(sent_twice, "the command to gw-1 sent twice", timeout_s=10.0)
        with parties(Party(rig.local, "gw-1", topics.down("gateways", "gw-1"))) as (gw1,):
            await gw1.publish(topics.status("gateways", "gw-1"), presence_payload("online"), retain=True)
            cmd = await gw1.next("command", timeout=1.0)
            assert isinstance(cmd, Command) and cmd.request_id == "q5"


async def test_a_command_past_its_deadline_before_any_ack_is_reported_expired(rig: Rig) -> None:
    start = datetime.now(UTC) - timedelta(seconds=5)
    params = EmergencyParams(start=start, end=datetime.now(UTC) + timedelta(seconds=0.5), power_limit_kw=1.0)
    req = Request(request_id="q-exp", kind=RequestKind.EMERGENCY, client_ids=["c2"], params=params,
                  expires_at=params.end)
    with parties(Party(rig.hub_broker, "hub", topics.all_up("retailers"))) as (hub,):
        await hub.publish(topics.down("retailers", "r1"), req)
        await hub.next("ack")
        out = await hub.next("outcome", timeout=5)
        assert isinstance(out, Outcome) and out.client_id == "c2"
        assert out.state is ClientState.EXPIRED and "expired" in out.detail["reason"]
