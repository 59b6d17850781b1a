"""The fleet's simulated gateway answers a revised command with that revision's outcome (a real Mosquitto): the
bridge closes a command only on an outcome of its own revision or a newer one, so an outcome that said revision 1
to a revision-2 command left it open until it was reported unreachable."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from mhp_wire import topics
from mhp_wire.messages import ClientState, Command, EmergencyParams, Outcome, RequestKind
from mhp_wire.mqtt import MqttEndpoint
from sim.fleet import FleetGateway
from tests.broker_fixtures import MosquittoFactory
from tests.mqtt_party import Party, parties


async def test_a_fleet_gateway_answers_a_revised_command_with_its_revision(
        mosquitto_factory: MosquittoFactory) -> None:
    local = mosquitto_factory("retailer", ["gw-1"], "bridge")
    endpoint = MqttEndpoint(local.host, local.port, "gw-1", local.identities["gw-1"].password)
    gateway = FleetGateway("gw-1", "c1", endpoint)
    start = datetime.now(UTC)
    params = EmergencyParams(start=start, end=start + timedelta(seconds=300), power_limit_kw=1.0)
    with parties(Party(local, "bridge", topics.all_up("gateways"))) as (bridge,):
        async with gateway.link:
            for revision in (1, 3):
                cmd = Command(request_id="em-1", client_id="c1", kind=RequestKind.EMERGENCY, params=params,
                              expires_at=params.end, revision=revision)
                await bridge.publish(topics.down("gateways", "gw-1"), cmd)
                out = await bridge.next("outcome", timeout=10)
                assert isinstance(out, Outcome), out
                assert (out.request_id, out.client_id, out.state) == ("em-1", "c1", ClientState.EXECUTED), out
                assert out.revision == revision, out  # on main: 1 for the revision-3 command
    assert gateway.received["em-1"][0] == 2
