"""Log flooding: what a party sends reaches the logs rate-limited, clipped and escaped (never a raw newline).

A retailer flooding strange topics, a ``ref_msg_id`` of 200 KB with newlines, an error text of many lines, a
gateway's payload whose keys hold newlines: each produces a bounded number of log lines, each one line long.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from mhp_wire import topics
from mhp_wire.logsafe import Once, outside
from mhp_wire.messages import ErrorReply, WireError, decode, encode
from retailer_bridge.service import Bridge
from retailer_bridge.settings import BridgeSettings
from tests.broker_fixtures import MosquittoFactory
from tests.cloud_hub.test_relay import metric
from tests.hems_firmware.test_gateway import Rig as GatewayRig
from tests.hems_firmware.test_gateway import rig  # noqa: F401  (the gateway rig, a fixture)
from tests.hub_fixtures import HubHandle, running_hub
from tests.mqtt_party import Party, parties
from tests.waiting import eventually

FLOOD = 300
BURST = 5
MULTILINE_ID = ("x" * 99 + "\n") * 2_000
"""A ref_msg_id of 200,000 characters and 2,000 lines (the broker's packet limit is 256 KiB)."""
MULTILINE_TEXT = "refused\nFORGED 2026 CRITICAL everything is fine\n" * 30


def error_payload(ref_msg_id: str | None, message: str) -> bytes:
    """An ``error`` written by hand, as a hostile party would (the models refuse to build it)."""
    return json.dumps({"v": 1, "type": "error", "msg_id": "e1", "sent_at": datetime.now(UTC).isoformat(),
                       "ref_msg_id": ref_msg_id, "code": "invalid", "message": message}).encode()


def lines_of(caplog: pytest.LogCaptureFixture, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger]


def assert_one_line_each(lines: list[str], limit: int = 1_000) -> None:
    for line in lines:
        assert not any(c in line for c in "\n\r\x85\u2028\u2029"), f"a raw line break in the log: {line[:200]!r}"
        assert len(line) <= limit, f"a log line of {len(line)} characters"



@pytest.fixture
async def strict_hub(request: pytest.FixtureRequest, tmp_path: Path, mosquitto_factory: MosquittoFactory
                     ) -> AsyncIterator[HubHandle]:
    """A hub whose per-retailer MQTT budget is a burst of 5 (refilled so slowly that no test sees a token more)."""
    async for h in running_hub(request, tmp_path, mosquitto_factory, "sqlite", mqtt_rate_limit_per_s=0.0001,
                               mqtt_rate_limit_burst=BURST):
        yield h


# -- the hub ---------------------------------------------------------------------------------------------------


async def test_a_flood_on_unknown_topics_is_rate_limited_before_it_is_logged(
        strict_hub: HubHandle, caplog: pytest.LogCaptureFixture) -> None:
    hub = strict_hub
    caplog.set_level(logging.DEBUG, logger="cloud_hub.relay")
    with parties(Party(hub.broker, "r1")) as (r1,):
        for i in range(FLOOD):
            await r1.publish(f"mhp/v1/retailers/r1/up/junk{i}\u2028FORGED line {i}", b"{}")

        async def refused() -> float:
            text = (await hub.http.get("/metrics")).text
            return (metric(text, "mhp_mqtt_rejected_total", reason="topic")
                    + metric(text, "mhp_mqtt_rejected_total", reason="rate_limited"))

        for _ in range(500):
            if await refused() >= FLOOD:
                break
            await asyncio.sleep(0.02)
        assert await refused() == FLOOD, "every message is counted"
    logged = [line for line in lines_of(caplog, "cloud_hub.relay") if "junk" in line]
    assert len(logged) <= BURST, f"{len(logged)} log lines for a flood of {FLOOD}"
    assert_one_line_each(logged)
    assert "\\u2028" in logged[0], "the line separator is shown escaped"


async def test_a_multiline_ref_msg_id_and_error_text_are_never_logged_raw(
        hub: HubHandle, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="cloud_hub.relay")
    with parties(Party(hub.broker, "r1", topics.down("retailers", "r1"))) as (r1,):
        await r1.publish(topics.up("retailers", "r1"), error_payload(MULTILINE_ID, "x"))
        answer = await r1.next("error")
        assert isinstance(answer, ErrorReply) and "ref_msg_id" in answer.message, answer
        await r1.publish(topics.up("retailers", "r1"), error_payload("m\n1", MULTILINE_TEXT))

        async def reported() -> float:
            return metric((await hub.http.get("/metrics")).text, "mhp_mqtt_received_total", type="error")

        for _ in range(250):
            if await reported() >= 1:
                break
            await asyncio.sleep(0.02)
    logged = lines_of(caplog, "cloud_hub.relay")
    assert len(logged) == 2, logged
    assert_one_line_each(logged)
    assert "FORGED" in logged[1] and "\\n" in logged[1]


# -- the bridge ------------------------------------------------------------------------------------------------


@pytest.fixture
async def bridge(tmp_path: Path, mosquitto_factory: MosquittoFactory) -> AsyncIterator[tuple[Bridge, Party]]:
    """A real bridge whose gateway gw-1 may send a burst of 5 messages (then hardly any), and gw-1's test client."""
    hub_broker = mosquitto_factory("hub", ["r1"], "hub")
    local = mosquitto_factory("retailer", ["gw-1"], "bridge")
    b = Bridge(BridgeSettings(
        retailer_id="r1", hub_mqtt_host=hub_broker.host, hub_mqtt_port=hub_broker.port,
        hub_mqtt_password=hub_broker.identities["r1"].password, local_mqtt_host=local.host,
        local_mqtt_port=local.port, local_mqtt_password=local.identities["bridge"].password,
        db_path=tmp_path / "bridge.db", customers={"c1": "gw-1"}, gateway_rate_limit_per_s=0.0001,
        gateway_rate_limit_burst=BURST))
    task = asyncio.create_task(b.run())
    try:
        await eventually(lambda: b.relay.local is not None and b.relay.local.connected, "the bridge connected")
        with parties(Party(local, "gw-1", topics.down("gateways", "gw-1"))) as (gw1,):
            yield b, gw1
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_gateway_flooding_the_bridge_with_multiline_garbage_gets_few_one_line_logs(
        bridge: tuple[Bridge, Party], caplog: pytest.LogCaptureFixture) -> None:
    b, gw1 = bridge
    caplog.set_level(logging.WARNING, logger="retailer_bridge.relay")
    # Keys are echoed in a validation error's location: a key with newlines is a forged log line.
    hostile = json.dumps({"v": 1, "type": "telemetry", "gateway_id": "gw-1", "client_id": "c1", "seq": 1,
                          "at": datetime.now(UTC).isoformat(),
                          "devices": {"meter\nFORGED CRITICAL line": {"x": "not a number"}}}).encode()
    await gw1.publish(topics.up("gateways", "gw-1"), error_payload("m-1", MULTILINE_TEXT))
    for _ in range(FLOOD):
        await gw1.publish(topics.up("gateways", "gw-1"), hostile)
    await eventually(lambda: b.relay.rejected["gateway_invalid"] + b.relay.rejected["gateway_rate_limited"] >= FLOOD,
                "the bridge counted the flood")
    logged = lines_of(caplog, "retailer_bridge.relay")
    assert len(logged) <= BURST, f"{len(logged)} log lines for a flood of {FLOOD}"
    assert any("FORGED" in line for line in logged)
    assert_one_line_each(logged)


async def test_the_hubs_multiline_error_text_is_logged_on_one_line_by_the_bridge(
        tmp_path: Path, mosquitto_factory: MosquittoFactory, caplog: pytest.LogCaptureFixture) -> None:
    hub_broker = mosquitto_factory("hub", ["r1"], "hub")
    local = mosquitto_factory("retailer", ["gw-1"], "bridge")
    caplog.set_level(logging.WARNING, logger="retailer_bridge.relay")
    b = Bridge(BridgeSettings(
        retailer_id="r1", hub_mqtt_host=hub_broker.host, hub_mqtt_port=hub_broker.port,
        hub_mqtt_password=hub_broker.identities["r1"].password, local_mqtt_host=local.host,
        local_mqtt_port=local.port, local_mqtt_password=local.identities["bridge"].password,
        db_path=tmp_path / "bridge.db", customers={"c1": "gw-1"}))
    task = asyncio.create_task(b.run())
    try:
        await eventually(lambda: b.relay.hub is not None and b.relay.hub.connected, "the bridge connected")
        with parties(Party(hub_broker, "hub")) as (hub,):
            await hub.publish(topics.down("retailers", "r1"), error_payload("m\n1", MULTILINE_TEXT))
            await eventually(lambda: b.relay.received["hub_error"] >= 1, "the bridge read the error")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    logged = lines_of(caplog, "retailer_bridge.relay")
    assert len(logged) == 1 and "FORGED" in logged[0], logged
    assert_one_line_each(logged)


# -- the gateway -----------------------------------------------------------------------------------------------


async def test_the_gateway_logs_an_error_answer_on_one_line(
        rig: GatewayRig, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    caplog.set_level(logging.WARNING, logger="hems_firmware.daemon")
    with parties(Party(rig.broker, "bridge")) as (bridge_party,):
        await bridge_party.publish(topics.down("gateways", "gw-1"), error_payload("m\n1", MULTILINE_TEXT))
        await eventually(lambda: any("FORGED" in line for line in lines_of(caplog, "hems_firmware.daemon")),
                    "the gateway logged the error answer")
    assert_one_line_each(lines_of(caplog, "hems_firmware.daemon"))


# -- the pieces ------------------------------------------------------------------------------------------------


def test_a_megabyte_ref_msg_id_is_refused_by_its_length_and_its_error_is_one_short_line() -> None:
    huge = ("y" * 999 + "\n") * 1_000  # 1 MB, 1,000 lines
    with pytest.raises(WireError) as exc:
        decode(error_payload(huge, "x"))
    assert "\n" not in str(exc.value) and len(str(exc.value)) < 200
    with pytest.raises(WireError, match="ref_msg_id: String should have at most 64 characters"):
        decode(error_payload(MULTILINE_ID, "x"))  # under the payload limit: refused by the model
    assert decode(error_payload("a" * 64, "x")).ref_msg_id == "a" * 64  # type: ignore[union-attr]


def test_every_decode_error_is_one_line() -> None:
    for payload in (b'{"type": "bad\\ntag"}', b'{"type": "telemetry", "devices": {"a\\nb": {"c": []}}}',
                    b'{"type": "ack", "ack_ids": ["\\u2028", 1]}', b"\n\n\n{"):
        with pytest.raises(WireError) as exc:
            decode(payload)
        assert_one_line_each([str(exc.value)], limit=2_000)
        assert "\u2028" not in str(exc.value)


@pytest.mark.parametrize(("value", "expected"), [
    ("gw-1", "gw-1"),
    ("a\nb", "a\\nb"),
    ("\x1b[31mred\r", "\\x1b[31mred\\r"),
    ("line\u2028sep", "line\\u2028sep"),
    ("\\n stays two characters", "\\n stays two characters"),
    (None, "None"),
    (12.5, "12.5"),
])
def test_outside_escapes_what_is_not_printable(value: object, expected: str) -> None:
    assert outside(value) == expected


def test_outside_clips_and_looks_only_at_what_it_keeps() -> None:
    got = outside("\n" * 1_000_000, limit=10)
    assert got == "\\n" * 10 + "... (1000000 characters)"
    assert outside("x" * 121) == "x" * 120 + "... (121 characters)"
    assert outside(ValueError("bad\nthing")) == "bad\\nthing"


def test_once_remembers_a_bounded_number_of_keys() -> None:
    once = Once(max_keys=3)
    assert [once.first(k) for k in ("a", "b", "a", "c", "d")] == [True, True, False, True, True]
    assert once.first("a"), "the oldest key was forgotten when a fourth came"
    assert not once.first("d")


def test_an_error_reply_built_here_names_a_message_id_of_at_most_64_characters() -> None:
    assert decode(encode(ErrorReply(ref_msg_id="m" * 64, code="invalid", message="x"))).type == "error"
    with pytest.raises(ValueError, match="at most 64"):
        ErrorReply(ref_msg_id="m" * 65, code="invalid", message="x")
