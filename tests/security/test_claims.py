"""Tampered claims: a home's claim of what it can shed is believed only up to what the believer knows of it.

The gateway's own report is bounded by its configured loads, the bridge's availability answer by the home's
rated sheddable loads (installation record, else the gateway's declaration), the hub's ``available_kw`` by the
client's contracted power; a non-finite claim is refused at decode. An absurd claim is not believed (the home counts
as unavailable), counted, and logged once per gateway (bridge) or client (hub).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from device_drivers.config import DeviceConfig
from hems_firmware.config import ConfigError, GatewayConfig
from mhp_wire import topics
from mhp_wire.messages import (
    ClientState,
    Outcome,
    Request,
    Telemetry,
    WireError,
    decode,
    encode,
    presence_payload,
)
from retailer_bridge.relay import BridgeRelay
from retailer_bridge.service import Bridge
from retailer_bridge.settings import BridgeSettings
from retailer_bridge.store import BridgeStore
from tests.broker_fixtures import BrokerHandle, MosquittoFactory
from tests.cloud_hub.test_relay import metric
from tests.hems_firmware.test_gateway import Rig as GatewayRig
from tests.hems_firmware.test_gateway import rig  # noqa: F401  (the gateway rig, a fixture)
from tests.hub_fixtures import HubHandle
from tests.mqtt_party import Party, parties

ABSURD_KW = 1e6


def soon(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


def telemetry_payload(gateway_id: str, client_id: str, seq: int, sheddable_kw: float, **extra: Any) -> bytes:
    """Telemetry as a tampered gateway writes it, by hand (so that it is the same bytes on any wire version)."""
    return json.dumps({"v": 1, "type": "telemetry", "msg_id": f"{gateway_id}-t{seq}",
                       "sent_at": datetime.now(UTC).isoformat(), "gateway_id": gateway_id, "client_id": client_id,
                       "seq": seq, "at": datetime.now(UTC).isoformat(), "devices": {}, "active_power_kw": 1.0,
                       "sheddable_kw": sheddable_kw, **extra}).encode()


@asynccontextmanager
async def bridge_for(hub: HubHandle, local: BrokerHandle, tmp_path: Path, **settings: Any) -> AsyncIterator[Bridge]:
    """A real bridge of retailer r1 between the hub's broker and its own, with customers c1 (gw-1), c2 (gw-2)."""
    bridge = Bridge(BridgeSettings(
        retailer_id="r1", hub_mqtt_host=hub.broker.host, hub_mqtt_port=hub.broker.port,
        hub_mqtt_password=hub.broker.identities["r1"].password, local_mqtt_host=local.host,
        local_mqtt_port=local.port, local_mqtt_password=local.identities["bridge"].password,
        db_path=tmp_path / "bridge.db", customers={"c1": "gw-1", "c2": "gw-2"}, **settings))
    task = asyncio.create_task(bridge.run())
    try:
        for _ in range(500):
            if bridge.relay.hub is not None and bridge.relay.hub.connected and bridge.relay.local is not None \
                    and bridge.relay.local.connected:
                break
            await asyncio.sleep(0.02)
        yield bridge
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def announce(bridge: Bridge, gateway: Party, gateway_id: str, client_id: str, sheddable_kw: float,
                   **extra: Any) -> None:
    """The gateway says it is online and publishes its (retained) telemetry; waits until the bridge has it."""
    await gateway.publish(topics.status("gateways", gateway_id), presence_payload("online"), retain=True)
    await gateway.publish(topics.telemetry(gateway_id),
                          telemetry_payload(gateway_id, client_id, 1, sheddable_kw, **extra), retain=True)
    for _ in range(250):
        if gateway_id in bridge.relay.latest_telemetry and bridge.relay.gateway_presence.get(gateway_id) == "online":
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"the bridge never took {gateway_id}'s telemetry: {dict(bridge.relay.rejected)}")


async def reduce(hub: HubHandle, reduction_kw: float) -> dict[str, Any]:
    """A load reduction for c1 and c2; returns the request once its availability phase is over."""
    r = await hub.http.post("/v1/load-reductions", headers=hub.auth("dso"), json={
        "client_ids": ["c1", "c2"], "reduction_kw": reduction_kw, "start": soon(60), "duration_s": 600,
        "respond_within_s": 5})
    assert r.status_code == 202, r.text
    request_id = r.json()["request_id"]
    for _ in range(200):
        req: dict[str, Any] = (await hub.http.get(f"/v1/requests/{request_id}", headers=hub.auth("dso"))).json()
        if "selection" in req:
            return req
        await asyncio.sleep(0.05)
    raise AssertionError(f"the availability phase never ended: {req}")


@pytest.fixture
def two_homes(mosquitto_factory: MosquittoFactory) -> BrokerHandle:
    return mosquitto_factory("retailer", ["gw-1", "gw-2"], "bridge")


# -- through the real chain ----------------------------------------------------------------------------------------


async def test_a_gateway_lying_about_everything_does_not_cover_a_load_reduction(
        hub: HubHandle, two_homes: BrokerHandle, tmp_path: Path) -> None:
    """gw-1 (a tampered gateway with its own credentials) claims 1e6 kW sheddable, and declares ratings as absurd,
    and its bridge has no installation record: the hub's bound (contracted power 6.9 kW) refuses the claim, so the
    500 kW reduction is not ``covered`` by that one home; the honest home c2 is chosen instead."""
    await hub.setup_registry({"c1": "r1", "c2": "r1"})
    async with bridge_for(hub, two_homes, tmp_path) as bridge:
        with parties(Party(two_homes, "gw-1"), Party(two_homes, "gw-2")) as (gw1, gw2):
            await announce(bridge, gw1, "gw-1", "c1", ABSURD_KW)
            await announce(bridge, gw2, "gw-2", "c2", 3.0)
            req = await reduce(hub, 500.0)
    assert req["clients"]["c1"]["state"] == "unavailable", req["clients"]["c1"]
    assert "not believed" in req["clients"]["c1"]["detail"]["reason"]
    assert req["selection"]["chosen"] == ["c2"] and req["selection"]["covered"] is False, req["selection"]
    assert req["selection"]["selected_kw"] == 3.0
    assert metric((await hub.http.get("/metrics")).text, "mhp_claims_refused_total") == 1


async def test_the_bridge_refuses_a_claim_above_the_homes_rated_sheddable_loads(
        hub: HubHandle, two_homes: BrokerHandle, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The bridge knows c1's rated sheddable loads (6.9 kW, installation record): gw-1's 1e6 kW claim is answered
    ``unavailable`` at the bridge, counted per message, logged once for the gateway."""
    await hub.setup_registry({"c1": "r1", "c2": "r1"})
    caplog.set_level(logging.WARNING, logger="retailer_bridge.relay")
    async with bridge_for(hub, two_homes, tmp_path, customer_sheddable_kw={"c1": 6.9, "c2": 6.9}) as bridge:
        with parties(Party(two_homes, "gw-1"), Party(two_homes, "gw-2")) as (gw1, gw2):
            await announce(bridge, gw1, "gw-1", "c1", ABSURD_KW)
            await announce(bridge, gw2, "gw-2", "c2", 2.5)
            for seq in range(2, 12):  # the same lie, again and again
                await gw1.publish(topics.telemetry("gw-1"), telemetry_payload("gw-1", "c1", seq, ABSURD_KW))
            for _ in range(250):
                if bridge.relay.rejected["gateway_claim_refused"] >= 11:
                    break
                await asyncio.sleep(0.02)
            req = await reduce(hub, 500.0)
        assert bridge.relay.rejected["gateway_claim_refused"] == 11
    c1 = req["clients"]["c1"]
    assert c1["state"] == "unavailable" and "rated sheddable loads" in c1["detail"]["reason"], c1
    assert c1["detail"]["available_kw"] == 0.0
    assert req["selection"]["chosen"] == ["c2"] and req["selection"]["covered"] is False
    lines = [r for r in caplog.records if "claims" in r.getMessage() and "gw-1" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert metric((await hub.http.get("/metrics")).text, "mhp_claims_refused_total") == 0, \
        "the bridge refused it already: the hub saw no absurd claim"


async def test_the_hub_refuses_an_available_kw_above_the_contracted_power_and_logs_it_once(
        hub: HubHandle, caplog: pytest.LogCaptureFixture) -> None:
    """A retailer (tampered bridge) answers availability with 1e6 kW for its client, in two requests: each time the
    client counts as unavailable and the refusal is counted; the log says it once."""
    await hub.setup_registry({"c1": "r1", "c2": "r1"})
    caplog.set_level(logging.WARNING, logger="cloud_hub.relay")
    with parties(Party(hub.broker, "r1", topics.down("retailers", "r1"))) as (r1,):
        for _ in range(2):
            r = await hub.http.post("/v1/load-reductions", headers=hub.auth("dso"), json={
                "client_ids": ["c1", "c2"], "reduction_kw": 5.0, "start": soon(60), "duration_s": 600,
                "respond_within_s": 5})
            request_id = r.json()["request_id"]
            await r1.next("request")
            for cid, kw in (("c1", ABSURD_KW), ("c2", 6.9)):  # 6.9 kW: exactly the contracted power, believed
                await r1.publish(topics.up("retailers", "r1"), Outcome(
                    request_id=request_id, client_id=cid, state=ClientState.AVAILABLE, detail={"available_kw": kw}))
            disconnect = await r1.next("request")
            assert isinstance(disconnect, Request) and disconnect.client_ids == ["c2"]
            req = (await hub.http.get(f"/v1/requests/{request_id}", headers=hub.auth("dso"))).json()
            assert req["clients"]["c1"]["state"] == "unavailable"
            assert req["clients"]["c1"]["detail"]["claimed_kw"] == ABSURD_KW
            assert req["selection"]["chosen"] == ["c2"] and req["selection"]["selected_kw"] == 6.9
    assert metric((await hub.http.get("/metrics")).text, "mhp_claims_refused_total") == 2
    lines = [r for r in caplog.records if "not believed" in r.getMessage()]
    assert len(lines) == 1 and "c1" in lines[0].getMessage(), [r.getMessage() for r in lines]


async def test_a_non_finite_claim_is_refused_at_the_bridge_with_an_error(
        hub: HubHandle, two_homes: BrokerHandle, tmp_path: Path) -> None:
    """JSON ``1e999`` as a claim: refused at decode (an ``error`` answer names the field), nothing believed."""
    async with bridge_for(hub, two_homes, tmp_path) as bridge:
        with parties(Party(two_homes, "gw-1", topics.down("gateways", "gw-1"))) as (gw1,):
            payload = telemetry_payload("gw-1", "c1", 1, 1.0).replace(b'"sheddable_kw": 1.0', b'"sheddable_kw": 1e999')
            await gw1.publish(topics.telemetry("gw-1"), payload)
            err = await gw1.next("error")
            assert "sheddable_kw" in err.message and "finite" in err.message  # type: ignore[union-attr]
        assert "gw-1" not in bridge.relay.latest_telemetry
        assert bridge.relay.rejected["gateway_invalid"] == 1


# -- each bound on its own -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("client", "claim", "declared", "state", "available_kw"), [
    ("c1", 4.999, None, ClientState.AVAILABLE, 4.999),        # under the installation record
    ("c1", 5.0, None, ClientState.AVAILABLE, 5.0),            # at it
    ("c1", 5.5, None, ClientState.UNAVAILABLE, 0.0),          # above it
    ("c1", 5.5, 1e6, ClientState.UNAVAILABLE, 0.0),           # a declaration does not raise the record
    ("c2", 3.0, 4.0, ClientState.AVAILABLE, 3.0),             # no record: bounded by the gateway's declaration
    ("c2", 4.5, 4.0, ClientState.UNAVAILABLE, 0.0),           # ... which contradicts its claim
    ("c2", 40.0, None, ClientState.AVAILABLE, 40.0),          # neither known (an old gateway): the hub bounds it
])
async def test_the_bridge_bounds_availability_by_the_rated_sheddable_loads(
        tmp_path: Path, client: str, claim: float, declared: float | None, state: ClientState,
        available_kw: float) -> None:
    store = BridgeStore(tmp_path / "b.db")
    try:
        relay = BridgeRelay("r1", {"c1": "gw-1", "c2": "gw-2"}, store, rated_sheddable_kw={"c1": 5.0})
        gid = relay.customers[client]
        relay.gateway_presence[gid] = "online"
        relay.latest_telemetry[gid] = Telemetry(gateway_id=gid, client_id=client, seq=1, at=datetime.now(UTC),
                                                devices={}, sheddable_kw=claim, rated_sheddable_kw=declared)
        out = relay.availability("q", client, gid)
        assert (out.state, out.detail["available_kw"]) == (state, available_kw), out.detail
    finally:
        await store.close()


@pytest.mark.parametrize("field", ["sheddable_kw", "active_power_kw", "rated_sheddable_kw"])
@pytest.mark.parametrize("literal", [b"1e999", b"-1e999", b"NaN", b"Infinity", b"-Infinity"])
def test_a_non_finite_telemetry_claim_is_refused_at_decode(field: str, literal: bytes) -> None:
    good = encode(Telemetry(gateway_id="gw-1", client_id="c1", seq=1, at=datetime.now(UTC), devices={},
                            active_power_kw=1.0, sheddable_kw=1.0, rated_sheddable_kw=1.0))
    bad = good.replace(f'"{field}":1.0'.encode(), f'"{field}":'.encode() + literal)
    assert bad != good
    with pytest.raises(WireError, match=f"{field}.*finite"):
        decode(bad)


@pytest.mark.parametrize("literal", [b"1e999", b"NaN", b"Infinity", b"-Infinity"])
def test_a_non_finite_available_kw_is_refused_at_decode(literal: bytes) -> None:
    good = encode(Outcome(request_id="q", client_id="c1", state=ClientState.AVAILABLE, detail={"available_kw": 1.0}))
    with pytest.raises(WireError, match="available_kw must be a finite number"):
        decode(good.replace(b'"available_kw":1.0', b'"available_kw":' + literal))


def test_a_sender_still_writes_a_non_finite_value_as_null() -> None:
    """The documented encode behaviour is kept: a value that is not finite travels as ``null`` (and decodes)."""
    tel = Telemetry(gateway_id="gw-1", client_id="c1", seq=1, at=datetime.now(UTC), devices={"m": {"x": float("nan")}},
                    sheddable_kw=float("inf"))
    got = decode(encode(tel))
    assert isinstance(got, Telemetry) and got.sheddable_kw is None and got.devices == {"m": {"x": None}}


def test_a_claim_that_is_not_a_power_reaches_the_hub_as_before() -> None:
    """``detail`` stays free-form: a missing or non-numeric ``available_kw`` still decodes (the hub counts it 0)."""
    for detail in ({}, {"available_kw": "abc"}, {"available_kw": None}):
        raw = encode(Outcome(request_id="q", client_id="c1", state=ClientState.AVAILABLE, detail=detail))
        assert isinstance(decode(raw), Outcome)


def test_a_rated_power_must_be_finite_and_bounded(tmp_path: Path) -> None:
    """The gateway's claim is the sum of its configured ratings: an ``inf`` (valid TOML) or an absurd rating is a
    configuration error, named, before the gateway starts."""
    for rating in ("inf", "nan", "1e6"):
        path = tmp_path / f"gw-{rating}.toml"
        path.write_text(f"""
[gateway]
id = "gw-1"
client_id = "c1"
[gateway.uplink]
host = "127.0.0.1"
port = 1884
password = "x"
[[devices]]
name = "heater"
driver = "modbus_relay"
transport = "modbus-tcp"
host = "127.0.0.1"
port = 1502
coil = 0
sheddable = true
rated_power_kw = {rating}
""")
        with pytest.raises(ConfigError, match="rated_power_kw"):
            GatewayConfig.load(path)
    ok = DeviceConfig(name="heater", driver="modbus_relay", transport="modbus-tcp", host="127.0.0.1", port=1502,
                      coil=0, sheddable=True, rated_power_kw=2.0)
    assert ok.rated_power_kw == 2.0


async def test_the_gateway_reports_its_rated_sheddable_loads_and_never_claims_more(rig: GatewayRig) -> None:  # noqa: F811
    """A real gateway (heater 2.0 kW and EV 3.7 kW sheddable, fridge not): its telemetry declares 5.7 kW rated
    sheddable, and its claim is never above that."""
    with parties(Party(rig.broker, "bridge", topics.all_up("gateways"))) as (bridge,):
        for _ in range(3):
            tel = await bridge.next("telemetry")
            assert isinstance(tel, Telemetry)
            assert tel.rated_sheddable_kw == 5.7
            assert tel.sheddable_kw is not None and 0 <= tel.sheddable_kw <= tel.rated_sheddable_kw
    assert rig.gateway.rated_sheddable_kw() == 5.7
