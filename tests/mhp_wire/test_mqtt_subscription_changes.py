"""``MqttLink.subscribe``/``unsubscribe``: a link's filters changed while it runs (issue 14, fifth round: a bridge
partition follows its gateways), against a real Mosquitto rendered from ``broker_config/``.

A change made while connected is in the broker's session when the call returns (its SUBACK/UNSUBACK); one made
while the link is down is sent when it is back, also when the broker kept the session (which restores the filters
it held, not the changes); many filters go in packets the broker accepts (``max_packet_size``).
"""

from __future__ import annotations

from mhp_wire import topics
from mhp_wire.mqtt import FILTERS_PER_PACKET, MqttEndpoint, MqttLink
from tests.broker_fixtures import BROKER_DEBUG_LOG, BrokerHandle, MosquittoFactory, all_acknowledged
from tests.mqtt_party import Party, parties
from tests.waiting import eventually


def bridge_link(broker: BrokerHandle, got: list[str], *filters: str) -> MqttLink:
    async def handler(topic: str, payload: bytes, retained: bool) -> None:
        got.append(topics.sender_of(topic) or topic)

    ident = broker.privileged
    return MqttLink(MqttEndpoint(broker.host, broker.port, ident.username, ident.password), client_id=ident.username,
                    subscriptions=list(filters), handler=handler, reconnect_delay_s=0.1)


async def send_each(broker: BrokerHandle, gateways: list[str]) -> None:
    """Each gateway publishes one telemetry message (waiting for its PUBACK), in this order."""
    with parties(*(Party(broker, g) for g in gateways)) as made:
        for g, party in zip(gateways, made, strict=True):
            await party.publish(topics.telemetry(g), b"{}")


async def test_filters_changed_while_connected_take_effect_when_the_call_returns(
        mosquitto_factory: MosquittoFactory) -> None:
    broker = mosquitto_factory("retailer", ["gw-1", "gw-2", "gw-3"], "bridge")
    got: list[str] = []
    async with bridge_link(broker, got, topics.party_up("gateways", "gw-1")) as link:
        await link.subscribe([topics.party_up("gateways", "gw-2"), topics.party_up("gateways", "gw-1")])
        await link.unsubscribe([topics.party_up("gateways", "gw-1")])
        assert link.subscriptions == [topics.party_up("gateways", "gw-2")]
        await send_each(broker, ["gw-1", "gw-3", "gw-2"])
        await eventually(lambda: got, "the message of gw-2")
        assert got == ["gw-2"]


async def test_filters_changed_while_the_link_is_down_are_sent_when_it_is_back_with_its_session(
        mosquitto_factory: MosquittoFactory) -> None:
    broker = mosquitto_factory("retailer", ["gw-1", "gw-2", "gw-3"], "bridge", log_types=BROKER_DEBUG_LOG)
    got: list[str] = []
    async with bridge_link(broker, got, *(topics.party_up("gateways", g) for g in ("gw-1", "gw-3"))) as link:
        await send_each(broker, ["gw-3"])  # the filters of the connection are in the session (its SUBSCRIBE is
        await eventually(lambda: got == ["gw-3"], "the message of gw-3")  # not waited for at a connection)
        # ...and the broker has the link's PUBACK of it: one still in flight at the stop is in the saved session,
        # and the broker sends it again when the session resumes (QoS 1), before the messages below.
        await eventually(lambda: all_acknowledged(broker.process.log_path, broker.privileged.username, 0),
                         "the broker has the PUBACK of gw-3's message")
        got.clear()
        broker.process.stop()  # SIGTERM: Mosquitto writes its snapshot, with our session and its two filters
        await eventually(lambda: not link.connected, "the link noticed")
        await link.subscribe([topics.party_up("gateways", "gw-2")])  # returns at once: sent when back
        await link.unsubscribe([topics.party_up("gateways", "gw-1")])
        broker.process.start()
        await eventually(lambda: link.connected, "the link is back")
        assert link.stats.extra.get("sessions_resumed") == 1, "the broker kept the session (filters gw-1, gw-3)"
        await send_each(broker, ["gw-1", "gw-2", "gw-3"])
        await eventually(lambda: len(got) >= 2, "the messages of gw-2 and gw-3")
        assert got == ["gw-2", "gw-3"], "gw-1 unsubscribed from the kept session, gw-2 added to it"


async def test_thousands_of_filters_fit_the_brokers_packet_size(mosquitto_factory: MosquittoFactory) -> None:
    broker = mosquitto_factory("retailer", ["gw-1"], "bridge")
    many = [topics.party_up("gateways", f"gw-{i:060d}") for i in range(3 * FILTERS_PER_PACKET + 7)]
    got: list[str] = []
    async with bridge_link(broker, got, *many) as link:  # at the connection: one SUBSCRIBE per 500
        await link.subscribe([topics.party_up("gateways", "gw-1")])
        await link.unsubscribe(many)  # the broker answers every packet: no packet was refused as too large
        assert link.subscriptions == [topics.party_up("gateways", "gw-1")] and link.connected
        await send_each(broker, ["gw-1"])
        await eventually(lambda: got, "the message of gw-1")
        assert got == ["gw-1"]
