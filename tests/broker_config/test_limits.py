"""The size limit, as Mosquitto 2.0 enforces ``max_packet_size`` on a paho MQTT 5 client."""

from __future__ import annotations

import time

import paho.mqtt.client as mqtt

from mhp_wire import topics
from tests.broker_fixtures import BrokerHandle, MosquittoFactory

from .conftest import ConnectAs


def test_oversize_packet_disconnects_the_sender(mosquitto_factory: MosquittoFactory, connect_as: ConnectAs) -> None:
    """paho sends the packet anyway (it does not enforce the broker's Maximum Packet Size); Mosquitto drops the
    connection ("disconnected due to oversize packet") and the message goes nowhere."""
    broker = mosquitto_factory("hub", ["r1"], "hub", max_packet_size=1024)
    hub = connect_as(broker, "hub")
    assert not hub.subscribe(topics.all_up("retailers")).is_failure
    r1 = connect_as(broker, "r1")

    rc = r1.publish_qos0(topics.up("retailers", "r1"), b"x" * 2048)
    if rc == mqtt.MQTT_ERR_NO_CONN and not _logged(broker, "oversize packet"):
        # The connection dropped before the oversize packet left: that is not what this test examines, so connect
        # again, and keep the broker's log in view. (NO_CONN with the broker's "oversize packet" is the behaviour
        # examined: Mosquitto reads the fixed header, sees the size and closes while paho still writes the body,
        # whose write then fails; on a loaded machine it does, both times.)
        dropped = broker.process.log_tail()
        r1.connect()
        rc = r1.publish_qos0(topics.up("retailers", "r1"), b"x" * 2048)
        assert rc == mqtt.MQTT_ERR_SUCCESS or _logged(broker, "oversize packet"), \
            f"dropped twice before the oversize packet; broker log: {dropped}"
    assert r1.disconnected.wait(3.0)

    r1.connect()
    rc = r1.publish(topics.up("retailers", "r1"), b"x" * 512)
    assert rc is not None and not rc.is_failure
    assert hub.next_message().payload == b"x" * 512  # the first message in: the oversize one never came
    assert _logged(broker, "oversize packet")


def _logged(broker: BrokerHandle, text: str, within_s: float = 3.0) -> bool:
    """Whether the broker's log shows ``text`` within ``within_s`` (Mosquitto writes its log asynchronously)."""
    deadline = time.monotonic() + within_s
    while text not in broker.process.log_tail():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True
