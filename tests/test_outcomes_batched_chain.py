"""A bridge sends its gateways' outcomes to the hub as one ``outcomes`` message per request and batch of reports,
through the real chain: the hub (uvicorn, real SQLite) and its Mosquitto, retailer r1's bridge and its Mosquitto,
and a fleet of simulated gateways (``sim.fleet``). The messages are counted where they arrive, by the hub
(``mhp_mqtt_received_total``); with ``hub_outcome_batches`` off the bridge sends one ``outcome`` per client, as
before (docs/protocol.md, "outcomes")."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from mhp_wire.mqtt import MqttEndpoint
from retailer_bridge.relay import OUTCOMES_PER_MESSAGE
from retailer_bridge.service import Bridge
from retailer_bridge.settings import BridgeSettings
from sim.fleet import FleetGateway
from tests.broker_fixtures import MosquittoFactory
from tests.cloud_hub.test_relay import metric, post_emergency, wait_state
from tests.hub_fixtures import HubHandle

N = 150


@pytest.mark.parametrize("batches", [True, False], ids=["outcomes-batched", "outcome-each"])
async def test_the_bridge_sends_one_outcomes_message_per_request_and_batch_and_the_hub_applies_them(
        hub: HubHandle, tmp_path: Path, mosquitto_factory: MosquittoFactory, batches: bool) -> None:
    gids = [f"gw-{i:03d}" for i in range(N)]
    customers = {f"c-{g}": g for g in gids}
    await hub.setup_registry(dict.fromkeys(customers, "r1"))
    local = mosquitto_factory("retailer", gids, "bridge")
    bridge = Bridge(BridgeSettings(
        retailer_id="r1", hub_mqtt_host=hub.broker.host, hub_mqtt_port=hub.broker.port,
        hub_mqtt_password=hub.broker.identities["r1"].password, local_mqtt_host=local.host,
        local_mqtt_port=local.port, local_mqtt_password=local.identities["bridge"].password,
        db_path=tmp_path / "bridge.db", telemetry_store="none", customers=customers, hub_outcome_batches=batches,
        # "No duplicate" below means: nothing acknowledged is sent again. The default first re-send (0.5 s) can come
        # before a loaded machine has read a gateway's ack; 5 s keeps the check about the bridge, not the load.
        gateway_retry_s=5.0))
    fleet = [FleetGateway(g, f"c-{g}", MqttEndpoint(local.host, local.port, g, local.identities[g].password))
             for g in gids]
    task = asyncio.create_task(bridge.run())
    try:
        async with contextlib.AsyncExitStack() as stack:
            for g in fleet:
                await stack.enter_async_context(g.link)
            for _ in range(400):  # the bridge is at the hub broker (else the hub sends it the request when it is)
                if bridge.relay.hub is not None and bridge.relay.hub.connected:
                    break
                await asyncio.sleep(0.05)
            request_id = await post_emergency(hub, list(customers))
            req = await wait_state(hub, request_id, "completed", timeout=30)
            assert req["state"] == "completed", req["retailers"]
            assert req["retailers"]["r1"]["states"] == {"executed": N}
            for _ in range(200):  # every outcome the hub acknowledged has left the bridge's outbox
                if (await bridge.store.counts()).get("hub_outbox") == 0:
                    break
                await asyncio.sleep(0.05)
            assert (await bridge.store.counts())["hub_outbox"] == 0
            reports = bridge.relay.gateway_reports
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    text = (await hub.http.get("/metrics")).text
    singles = metric(text, "mhp_mqtt_received_total", type="outcome")
    batched = metric(text, "mhp_mqtt_received_total", type="outcomes")
    assert metric(text, "mhp_mqtt_rejected_total", reason="invalid") == 0
    assert all(g.received[request_id][0] == 1 for g in fleet)  # one command per gateway, no duplicate
    if batches:
        # At most one message per request and batch of reports (a request's outcomes of a batch are one message
        # of up to OUTCOMES_PER_MESSAGE clients, a request with one outcome in a batch a plain outcome), fewer
        # than one per client; the fleet's acknowledgements and outcomes arrive in a few batches.
        assert N > OUTCOMES_PER_MESSAGE / 10 and batched >= 1
        assert singles + batched <= reports.commits, (singles, batched, reports.commits)
        assert singles + batched < N / 2, (singles, batched)
    else:
        assert batched == 0 and singles >= N  # one executed outcome per client, and some delivered ones
