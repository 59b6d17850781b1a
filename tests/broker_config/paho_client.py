"""A small synchronous paho-mqtt 2.x (MQTT 5) test client that records what the broker answers.

Only for tests of the broker configuration: it waits on the broker's own acknowledgements (CONNACK, SUBACK,
PUBACK) with short timeouts instead of sleeping, and keeps every reason code so tests can assert on them.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

TIMEOUT = 3.0
_ids = itertools.count()


def unique_client_id(prefix: str) -> str:
    """A client id no other test of this run uses."""
    return f"{prefix}-{time.monotonic_ns() % 10**9}-{next(_ids)}"


@dataclass(frozen=True)
class Received:
    """One message as the client received it."""

    topic: str
    payload: bytes
    qos: int
    retain: bool


class TestClient:
    """A paho MQTT 5 client on its own network thread; ``close()`` always stops that thread.

    The thread runs ``Client.loop()`` itself rather than ``loop_start()``: no automatic reconnection (a test
    reconnects explicitly), and stopping never waits for paho's reconnect back-off.
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        host: str,
        port: int,
        username: str | None,
        password: str | None,
        *,
        client_id: str | None = None,
        clean_start: bool = True,
        session_expiry: int = 0,
    ) -> None:
        self.host, self.port = host, port
        self.client_id = client_id or unique_client_id(username or "anon")
        self.clean_start = clean_start
        self.session_expiry = session_expiry
        self.messages: queue.Queue[Received] = queue.Queue()
        self.connack: ReasonCode | None = None
        self.session_present: bool | None = None
        self.disconnected = threading.Event()
        self._cond = threading.Condition()
        self._subacks: dict[int, list[ReasonCode]] = {}
        self._pubacks: dict[int, ReasonCode] = {}
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5,
        )
        if username is not None:
            self._client.username_pw_set(username, password)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_publish = self._on_publish
        self._client.on_message = self._on_message
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # --- paho callbacks (network thread) ---------------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Any) -> None:
        with self._cond:
            self.connack = rc
            self.session_present = bool(flags.session_present)
            self._cond.notify_all()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Any) -> None:
        self.disconnected.set()

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, rcs: list[ReasonCode], props: Any) -> None:
        with self._cond:
            self._subacks[mid] = list(rcs)
            self._cond.notify_all()

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, rc: ReasonCode, props: Any) -> None:
        with self._cond:
            self._pubacks[mid] = rc
            self._cond.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self.messages.put(Received(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain)))

    # --- test API --------------------------------------------------------------------------------------------

    def _wait(self, ready: Callable[[], bool], what: str, timeout: float) -> None:
        with self._cond:
            if not self._cond.wait_for(ready, timeout):
                raise TimeoutError(f"{self.client_id}: no {what} within {timeout} s")

    def connect(self, timeout: float = TIMEOUT) -> ReasonCode:
        """Connect and return the CONNACK reason code (a failure code when the login is refused)."""
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.session_expiry
        self.disconnected.clear()
        with self._cond:
            self.connack = None
        self._stop_thread()
        self._client.connect(self.host, self.port, keepalive=10, clean_start=self.clean_start, properties=props)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"paho-{self.client_id}", daemon=True)
        self._thread.start()
        self._wait(lambda: self.connack is not None, "CONNACK", timeout)
        assert self.connack is not None
        return self.connack

    def subscribe(self, topic: str, qos: int = 1, timeout: float = TIMEOUT) -> ReasonCode:
        """Subscribe and return the SUBACK reason code (granted QoS, or a failure such as 0x87)."""
        result, mid = self._client.subscribe(topic, qos)
        assert result == mqtt.MQTT_ERR_SUCCESS and mid is not None, result
        self._wait(lambda: mid in self._subacks, f"SUBACK for {topic}", timeout)
        return self._subacks[mid][0]

    def publish(
        self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False, timeout: float = TIMEOUT
    ) -> ReasonCode | None:
        """Publish; for QoS 1 wait for the PUBACK and return its reason code, for QoS 0 return ``None``."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, info.rc
        if qos == 0:
            info.wait_for_publish(timeout)
            return None
        self._wait(lambda: info.mid in self._pubacks, f"PUBACK for {topic}", timeout)
        return self._pubacks[info.mid]

    def publish_qos0(self, topic: str, payload: bytes, timeout: float = TIMEOUT) -> int:
        """Publish at QoS 0 and return paho's result code (``MQTT_ERR_NO_CONN`` when the connection had dropped)."""
        info = self._client.publish(topic, payload, qos=0)
        if info.rc == mqtt.MQTT_ERR_SUCCESS:
            info.wait_for_publish(timeout)
        return int(info.rc)

    def next_message(self, timeout: float = TIMEOUT) -> Received:
        """The next message received (raises ``queue.Empty`` after ``timeout``)."""
        return self.messages.get(timeout=timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._client.loop(timeout=0.05) != mqtt.MQTT_ERR_SUCCESS:
                self._stop.wait(0.05)  # disconnected: idle until connect() or close()

    def _stop_thread(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(TIMEOUT)
            self._thread = None

    def disconnect(self) -> None:
        """Disconnect cleanly and stop the network thread (the session stays if ``session_expiry`` > 0)."""
        if self._client.is_connected():
            self._client.disconnect()
            self.disconnected.wait(TIMEOUT)
        self._stop_thread()

    def close(self) -> None:
        """Disconnect if connected and stop the network thread; safe to call more than once."""
        self.disconnect()
