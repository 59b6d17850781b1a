"""Authentication and ACLs of both broker kinds, against a real Mosquitto 2.0 and paho-mqtt clients on MQTT 5.

What Mosquitto 2.0.11 does, as asserted here:

* a refused login (wrong password or unknown user) gets CONNACK 0x87 "Not authorized" (not 0x86);
* a denied QoS 1 PUBLISH gets PUBACK 0x87 "Not authorized", the message goes nowhere, the connection stays up;
  a denied QoS 0 PUBLISH is dropped silently;
* a SUBSCRIBE is *granted* whatever the filter (``#``, another party's topics): the ACL file is applied per
  message at delivery, so such a subscription simply never delivers anything the user may not read.

Negative checks avoid sleeping: after the forbidden action, an allowed message is sent the same way; Mosquitto
delivers in order, so if the sentinel arrives first and alone, the forbidden message did not get through.
"""

from __future__ import annotations

import queue
from dataclasses import dataclass
from typing import Any

import pytest
from paho.mqtt.reasoncodes import ReasonCode

from mhp_wire import topics
from tests.broker_fixtures import BrokerHandle, MosquittoFactory

from .conftest import ConnectAs
from .paho_client import Received, TestClient

NOT_AUTHORIZED = 0x87


@dataclass
class Case:
    """One broker kind: the broker, its privileged user and two parties ``a`` and ``b``."""

    broker: BrokerHandle
    kind: topics.PartyKind
    privileged: str
    a: str
    b: str


@pytest.fixture(params=["hub", "retailer"])
def case(request: pytest.FixtureRequest, mosquitto_factory: MosquittoFactory) -> Case:
    """The hub broker (hub; retailers r1, r2) and a retailer broker (bridge; gateways gw-1, gw-2)."""
    if request.param == "hub":
        return Case(mosquitto_factory("hub", ["r1", "r2"], "hub"), "retailers", "hub", "r1", "r2")
    return Case(mosquitto_factory("retailer", ["gw-1", "gw-2"], "bridge"), "gateways", "bridge", "gw-1", "gw-2")


def drain(client: TestClient, timeout: float = 0.05) -> list[Received]:
    """Messages already received (waits ``timeout`` for the last one)."""
    got: list[Received] = []
    while True:
        try:
            got.append(client.next_message(timeout))
        except queue.Empty:
            return got


def until_sentinel(client: TestClient, sentinel: bytes = b"sentinel") -> list[Received]:
    """Every message received up to and including the one with payload ``sentinel``, plus any already after it."""
    got: list[Received] = []
    while not got or got[-1].payload != sentinel:
        got.append(client.next_message())
    return got + drain(client, timeout=0.0)


def assert_code(rc: ReasonCode | None, value: int) -> None:
    assert rc is not None
    assert rc.value == value, f"expected 0x{value:02x}, got {rc} (0x{rc.value:02x})"


def assert_success(rc: ReasonCode | None) -> None:
    assert rc is not None
    assert not rc.is_failure, str(rc)


# --- authentication ------------------------------------------------------------------------------------------


def test_wrong_password_is_refused(case: Case, connect_as: ConnectAs) -> None:
    client = connect_as(case.broker, case.a, password="not-the-password", connect=False)
    assert_code(client.connect(), NOT_AUTHORIZED)


def test_unknown_user_is_refused(case: Case, connect_as: ConnectAs) -> None:
    client = connect_as(case.broker, "stranger", password="whatever", connect=False)
    assert_code(client.connect(), NOT_AUTHORIZED)


def test_anonymous_is_refused(case: Case) -> None:
    client = TestClient(case.broker.host, case.broker.port, None, None)
    try:
        assert_code(client.connect(), NOT_AUTHORIZED)
    finally:
        client.close()


def test_every_identity_logs_in(case: Case, connect_as: ConnectAs) -> None:
    for username in case.broker.identities:
        assert connect_as(case.broker, username).connack is not None


# --- parties ------------------------------------------------------------------------------------------------


def test_party_reads_its_down_and_writes_its_up(case: Case, connect_as: ConnectAs) -> None:
    priv = connect_as(case.broker, case.privileged)
    party = connect_as(case.broker, case.a)
    assert_success(priv.subscribe(topics.all_up(case.kind)))
    assert_success(party.subscribe(topics.down(case.kind, case.a)))

    assert_success(priv.publish(topics.down(case.kind, case.a), b"request"))
    assert party.next_message() == Received(topics.down(case.kind, case.a), b"request", 1, False)

    up_topics = [topics.up(case.kind, case.a), topics.status(case.kind, case.a)]
    if case.kind == "gateways":
        up_topics.append(topics.telemetry(case.a))
    for topic in up_topics:
        assert_success(party.publish(topic, b"answer"))
        assert priv.next_message() == Received(topic, b"answer", 1, False)


@pytest.mark.parametrize("wide", ["#", "mhp/v1/#", "{kind}/+/down/#", "{b_down}", "{b_prefix}/#"])
def test_party_never_receives_another_partys_down(case: Case, connect_as: ConnectAs, wide: str) -> None:
    priv = connect_as(case.broker, case.privileged)
    party = connect_as(case.broker, case.a)
    b_down = topics.down(case.kind, case.b)
    wide = wide.format(
        kind=f"{topics.PREFIX}/{case.kind}", b_down=b_down, b_prefix=f"{topics.PREFIX}/{case.kind}/{case.b}"
    )
    # Mosquitto 2.0 grants the subscription; the ACL filters at delivery.
    assert party.subscribe(wide).value == 1
    assert_success(party.subscribe(topics.down(case.kind, case.a)))

    assert_success(priv.publish(b_down, b"for b only"))
    assert_success(priv.publish(topics.down(case.kind, case.a), b"sentinel"))

    got = until_sentinel(party)
    assert {m.payload for m in got} == {b"sentinel"}, got


@pytest.mark.parametrize("target", ["b_up", "b_status", "b_down", "a_down", "public_status"])
def test_party_cannot_publish_outside_its_up(case: Case, connect_as: ConnectAs, target: str) -> None:
    priv = connect_as(case.broker, case.privileged)
    party = connect_as(case.broker, case.a)
    b_listener = connect_as(case.broker, case.b)
    topic = {
        "b_up": topics.up(case.kind, case.b),
        "b_status": topics.status(case.kind, case.b),
        "b_down": topics.down(case.kind, case.b),
        "a_down": topics.down(case.kind, case.a),
        "public_status": topics.PUBLIC_STATUS,
    }[target]
    assert_success(priv.subscribe(f"{topics.PREFIX}/#"))
    assert_success(b_listener.subscribe(topics.down(case.kind, case.b)))

    # QoS 1: the broker answers PUBACK 0x87 and keeps the connection.
    assert_code(party.publish(topic, b"forged"), NOT_AUTHORIZED)
    # QoS 0: no answer at all; the message is dropped.
    assert party.publish(topic, b"forged-qos0", qos=0) is None
    assert_success(party.publish(topics.up(case.kind, case.a), b"sentinel"))

    assert [m.payload for m in until_sentinel(priv)] == [b"sentinel"]
    assert_success(priv.publish(topics.down(case.kind, case.b), b"sentinel"))
    assert [m.payload for m in until_sentinel(b_listener)] == [b"sentinel"]


def test_party_reads_retained_tariff_but_cannot_write_it(case: Case, connect_as: ConnectAs) -> None:
    priv = connect_as(case.broker, case.privileged)
    assert_success(priv.publish(topics.TARIFF, b"tariff-1", retain=True))

    party = connect_as(case.broker, case.a)
    assert_success(party.subscribe(topics.PUBLIC_ALL))
    assert party.next_message() == Received(topics.TARIFF, b"tariff-1", 1, True)

    assert_code(party.publish(topics.TARIFF, b"forged", retain=True), NOT_AUTHORIZED)
    assert_success(priv.publish(topics.PUBLIC_STATUS, b"sentinel"))
    assert [m.payload for m in until_sentinel(party)] == [b"sentinel"]

    late = connect_as(case.broker, case.b)
    assert_success(late.subscribe(topics.TARIFF))
    assert late.next_message() == Received(topics.TARIFF, b"tariff-1", 1, True)


def test_party_cannot_read_sys(case: Case, connect_as: ConnectAs) -> None:
    party = connect_as(case.broker, case.a)
    assert party.subscribe("$SYS/broker/version").value == 1
    assert_success(party.subscribe(topics.down(case.kind, case.a)))
    priv = connect_as(case.broker, case.privileged)
    assert_success(priv.publish(topics.down(case.kind, case.a), b"sentinel"))
    assert [m.topic for m in until_sentinel(party)] == [topics.down(case.kind, case.a)]


# --- privileged identities ----------------------------------------------------------------------------------


def test_privileged_reads_and_writes_the_whole_tree(case: Case, connect_as: ConnectAs) -> None:
    priv = connect_as(case.broker, case.privileged)
    assert_success(priv.subscribe(f"{topics.PREFIX}/#"))
    every_topic = [
        topics.down(case.kind, case.a),
        topics.down(case.kind, case.b),
        topics.up(case.kind, case.a),  # e.g. replaying for a party in a test or a simulator
        topics.status(case.kind, case.b),
        topics.TARIFF,
        topics.PUBLIC_STATUS,
    ]
    for topic in every_topic:
        assert_success(priv.publish(topic, b"x"))
    assert [priv.next_message().topic for _ in every_topic] == every_topic

    a = connect_as(case.broker, case.a)
    assert_success(a.publish(topics.up(case.kind, case.a), b"from a"))
    assert priv.next_message().payload == b"from a"


def test_privileged_reads_broker_statistics(case: Case, connect_as: ConnectAs) -> None:
    priv = connect_as(case.broker, case.privileged)
    assert_success(priv.subscribe("$SYS/broker/version"))
    assert priv.next_message().payload.startswith(b"mosquitto version")


def test_extra_privileged_identity_has_the_same_rights(
    mosquitto_factory: MosquittoFactory, connect_as: ConnectAs
) -> None:
    broker = mosquitto_factory("hub", ["r1"], "hub", extra_privileged=["sim"])
    sim = connect_as(broker, "sim")
    r1 = connect_as(broker, "r1")
    assert_success(sim.subscribe(topics.all_up("retailers")))
    assert_success(r1.subscribe(topics.down("retailers", "r1")))

    assert_success(sim.publish(topics.down("retailers", "r1"), b"from sim"))
    assert r1.next_message().payload == b"from sim"
    assert_success(r1.publish(topics.up("retailers", "r1"), b"to sim"))
    assert sim.next_message().payload == b"to sim"
    assert_success(sim.publish(topics.TARIFF, b"t", retain=True))


def test_a_party_named_like_the_privileged_side_cannot_exist(mosquitto_factory: MosquittoFactory) -> None:
    from broker_config import BrokerConfigError

    with pytest.raises(BrokerConfigError, match="reserved"):
        mosquitto_factory("retailer", ["bridge"], "hub")


# --- client ids -----------------------------------------------------------------------------------------------


def test_without_use_username_as_clientid_a_party_can_take_over_another_partys_client_id(
    mosquitto_factory: MosquittoFactory, connect_as: ConnectAs
) -> None:
    """Mosquitto alone does not tie client ids to usernames: r2 reusing r1's client id kicks r1 and takes its
    session. (Before the hostile-input round this was the default of ``BrokerSpec``; it is now an opt-out.)

    r2 never receives r1's messages (the ACL is checked at delivery), but messages for r1 that reach the session
    while r2 holds it are dropped, and are missing when r1 comes back (so is what was queued before the
    takeover): a denial of service by anyone who knows a client id.
    ``use_username_as_clientid`` (on by default) closes this.
    """
    hub_broker = mosquitto_factory("hub", ["r1", "r2"], "hub", use_username_as_clientid=False)
    persistent: dict[str, Any] = {"client_id": "shared-id", "clean_start": False, "session_expiry": 3600}
    r1 = connect_as(hub_broker, "r1", **persistent)
    assert_success(r1.subscribe(topics.down("retailers", "r1")))
    r2 = connect_as(hub_broker, "r2", **persistent)
    assert r1.disconnected.wait(3.0), "r1 was not disconnected"
    assert r2.session_present is True  # r1's session

    hub = connect_as(hub_broker, "hub")
    assert_success(hub.publish(topics.down("retailers", "r1"), b"queued for r1"))
    assert_success(r2.subscribe(topics.down("retailers", "r2")))
    assert_success(hub.publish(topics.down("retailers", "r2"), b"sentinel"))
    assert [m.payload for m in until_sentinel(r2)] == [b"sentinel"]
    r2.close()

    r1.connect()
    assert r1.session_present is True
    assert_success(hub.publish(topics.down("retailers", "r1"), b"sentinel"))
    assert [m.payload for m in until_sentinel(r1)] == [b"sentinel"]  # "queued for r1" is lost


def test_use_username_as_clientid_prevents_the_takeover(
    mosquitto_factory: MosquittoFactory, connect_as: ConnectAs
) -> None:
    broker = mosquitto_factory("retailer", ["gw-1", "gw-2"], "bridge")  # on by default
    gw1 = connect_as(broker, "gw-1", client_id="shared-id")
    connect_as(broker, "gw-2", client_id="shared-id")
    bridge = connect_as(broker, "bridge")
    assert_success(bridge.subscribe(topics.all_up("gateways")))
    assert_success(gw1.publish(topics.up("gateways", "gw-1"), b"still connected"))
    assert bridge.next_message().payload == b"still connected"
    assert not gw1.disconnected.is_set()

    # The price: a second connection of the same username replaces the first.
    second = connect_as(broker, "gw-1", client_id="another-id")
    assert gw1.disconnected.wait(3.0)
    assert_success(second.publish(topics.up("gateways", "gw-1"), b"second"))
    assert bridge.next_message().payload == b"second"
