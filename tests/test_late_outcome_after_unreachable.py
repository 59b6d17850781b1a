"""A gateway that acknowledges after the bridge's ack timeout, and then executes, ends ``executed`` at the hub, not
``unreachable`` (issue 14: 2 of 1,315 homes of the 100,000-gateway run were reported unreachable although they shed
their load). Through the real chain: the hub (uvicorn, real SQLite) and its Mosquitto, retailer r1's bridge and its
Mosquitto, and gateway gw-1 played by a paho client on the retailer broker that holds its acknowledgement past the
bridge's ``gateway_ack_timeout_s`` (set small), as a gateway reached late by the broker's queue does.

``unreachable`` is the bridge's inference, the gateway's outcome a fact: the fact replaces it (same revision only),
the request's state is derived again, and the change is an event like any other (docs/decisions.md, "A late outcome
supersedes unreachable")."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from mhp_wire import topics
from mhp_wire.messages import Ack, ClientState, Command, Outcome
from retailer_bridge.service import Bridge
from retailer_bridge.settings import BridgeSettings
from tests.broker_config.paho_client import TestClient
from tests.broker_fixtures import BrokerHandle, MosquittoFactory
from tests.cloud_hub.sse import Frame, sse
from tests.cloud_hub.test_relay import metric, post_emergency, wait_state
from tests.hub_fixtures import HubHandle
from tests.mqtt_party import Party, parties
from tests.waiting import eventually

ACK_TIMEOUT_S = 0.5


@pytest.fixture
async def bridge(hub: HubHandle, tmp_path: Path, mosquitto_factory: MosquittoFactory
                 ) -> AsyncIterator[tuple[Bridge, BrokerHandle]]:
    """Retailer r1's bridge with a short ack timeout, at the hub broker and its own broker (gateways gw-1, gw-2)."""
    await hub.setup_registry({"c1": "r1", "c2": "r1"})
    local = mosquitto_factory("retailer", ["gw-1", "gw-2"], "bridge")
    b = Bridge(BridgeSettings(
        retailer_id="r1", hub_mqtt_host=hub.broker.host, hub_mqtt_port=hub.broker.port,
        hub_mqtt_password=hub.broker.identities["r1"].password, local_mqtt_host=local.host,
        local_mqtt_port=local.port, local_mqtt_password=local.identities["bridge"].password,
        db_path=tmp_path / "bridge.db", telemetry_store="none", customers={"c1": "gw-1", "c2": "gw-2"},
        gateway_ack_timeout_s=ACK_TIMEOUT_S, gateway_retry_s=0.2))
    task = asyncio.create_task(b.run())
    try:
        # At the hub broker (else the hub sends it the request when it is) and at its own.
        await eventually(lambda: b.relay.hub is not None and b.relay.hub.connected and b.relay.local is not None
                         and b.relay.local.connected, "the bridge is connected to both brokers", timeout_s=20)
        yield b, local
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def client_state(hub: HubHandle, request_id: str, client_id: str, state: str, timeout: float = 15.0
                       ) -> dict[str, Any]:
    """The request once ``client_id`` is in ``state`` (or as it is at the timeout)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        req: dict[str, Any] = (await hub.http.get(f"/v1/requests/{request_id}", headers=hub.auth("dso"))).json()
        if req["clients"][client_id]["state"] == state or loop.time() > deadline:
            return req
        await asyncio.sleep(0.05)


def client_event(client_id: str, state: str) -> Any:
    def done(f: Frame) -> bool:
        return bool(f.data and f.data.get("clients", {}).get(client_id, {}).get("state") == state)
    return done


async def test_a_gateway_that_acknowledges_late_and_executes_ends_executed_not_unreachable(
        hub: HubHandle, bridge: tuple[Bridge, BrokerHandle]) -> None:
    relay, local = bridge[0].relay, bridge[1]
    with parties(Party(local, "gw-1", topics.down("gateways", "gw-1")),
                 Party(local, "gw-2", topics.down("gateways", "gw-2"))) as (gw1, gw2):
        async with sse(hub.http, "/v1/events", hub.auth("dso")) as dso, \
                sse(hub.http, "/v1/events", hub.auth("r1")) as r1:
            request_id = await post_emergency(hub, ["c1", "c2"], lead_s=1)
            cmd1, cmd2 = await gw1.next("command"), await gw2.next("command")
            assert isinstance(cmd1, Command) and isinstance(cmd2, Command)
            # gw-2 answers in time and executes; gw-1 stays silent past the bridge's ack timeout.
            await gw2.publish(topics.up("gateways", "gw-2"), Ack(ack_ids=[cmd2.msg_id]))
            await gw2.publish(topics.up("gateways", "gw-2"), Outcome(
                request_id=request_id, client_id="c2", state=ClientState.EXECUTED, revision=cmd2.revision))
            req = await wait_state(hub, request_id, "partially_completed", timeout=15)
            assert req["state"] == "partially_completed", req  # the request has ended on the inference
            assert req["clients"]["c1"]["state"] == "unreachable", req["clients"]
            assert req["clients"]["c2"]["state"] == "executed", req["clients"]
            ended_at = req["completed_at"]
            assert ended_at is not None
            await dso.until(client_event("c1", "unreachable"))
            # The broker's queue reaches gw-1 late: it acknowledges, sheds its load and reports.
            await gw1.publish(topics.up("gateways", "gw-1"), Ack(ack_ids=[cmd1.msg_id]))
            late = Outcome(request_id=request_id, client_id="c1", state=ClientState.EXECUTED,
                           detail={"shed": ["water-heater"]}, revision=cmd1.revision)
            await gw1.publish(topics.up("gateways", "gw-1"), late)
            ack = await gw1.next("ack")
            assert isinstance(ack, Ack) and late.msg_id in ack.ack_ids
            req = await client_state(hub, request_id, "c1", "executed")
            c1 = req["clients"]["c1"]
            assert c1["state"] == "executed", c1  # on main: stays "unreachable"
            assert c1["detail"] == {"shed": ["water-heater"]}
            assert req["state"] == "completed", req  # derived again: every home executed
            assert req["completed_at"] == ended_at, "the request ended once; its state was corrected later"
            [was] = c1["superseded"]  # the inference it replaced stays visible
            assert was["state"] == "unreachable" and was["by"] == "executed" and was["revision"] == cmd1.revision
            assert "no acknowledgement" in was["detail"]["reason"]
            # The correction is an event like any other client change, for the DSO and for the client's retailer.
            for stream in (dso, r1):
                [*_, event] = await stream.until(client_event("c1", "executed"))
                assert event.data["request_id"] == request_id and event.data["state"] == "completed"
    text = (await hub.http.get("/metrics")).text
    assert metric(text, "mhp_outcomes_superseded_total") == 1
    # The bridge closed the command with the gateway's outcome, and the hub acknowledged it.
    commands = {c["client_id"]: c for c in await relay.store.commands_of(request_id)}
    assert commands["c1"]["state"] == "closed"
    for _ in range(100):
        if (await relay.store.counts())["hub_outbox"] == 0:
            break
        await asyncio.sleep(0.05)
    assert (await relay.store.counts())["hub_outbox"] == 0


class SessionGateway(Party):
    """Gateway gw-1 as a paho client with a persistent MQTT session (as the real gateway keeps one): while it is
    away the broker queues its QoS 1 commands, and delivers them when it connects again."""

    def __init__(self, broker: BrokerHandle, subscribe: bool) -> None:
        ident = broker.identities["gw-1"]
        self.client = TestClient(broker.host, broker.port, "gw-1", ident.password, clean_start=False,
                                 session_expiry=3600)
        rc = self.client.connect()
        assert not rc.is_failure, f"gw-1 refused: {rc}"
        if subscribe:
            assert not self.client.subscribe(topics.down("gateways", "gw-1")).is_failure


async def test_a_gateway_that_gets_its_queued_command_after_the_timeout_ends_executed(
        hub: HubHandle, bridge: tuple[Bridge, BrokerHandle]) -> None:
    """The 100,000-gateway case as it happened: the command waits in the broker's queue for the gateway's session
    past the bridge's ack timeout (here the gateway is away), then reaches it; the gateway acts and reports."""
    local = bridge[1]
    with parties(SessionGateway(local, subscribe=True)):
        pass  # the session, with its subscription, stays at the broker
    request_id = await post_emergency(hub, ["c1"], lead_s=1)
    req = await wait_state(hub, request_id, "failed", timeout=15)
    assert req["clients"]["c1"]["state"] == "unreachable", req["clients"]
    with parties(SessionGateway(local, subscribe=False)) as (gw,):
        cmd = await gw.next("command")  # queued by the broker while the gateway was away
        assert isinstance(cmd, Command) and cmd.request_id == request_id
        await gw.publish(topics.up("gateways", "gw-1"), Ack(ack_ids=[cmd.msg_id]))
        late = Outcome(request_id=request_id, client_id="c1", state=ClientState.EXECUTED, revision=cmd.revision)
        await gw.publish(topics.up("gateways", "gw-1"), late)
        req = await client_state(hub, request_id, "c1", "executed")
    assert req["clients"]["c1"]["state"] == "executed", req["clients"]  # on main: stays "unreachable"
    assert req["state"] == "completed", req
    assert [s["state"] for s in req["clients"]["c1"]["superseded"]] == ["unreachable"]
