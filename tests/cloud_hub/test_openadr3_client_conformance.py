"""The OpenADR 3.1 facade driven by a second client nobody here wrote: ``openadr3-client`` 2.4.2 (ElaadNL, PyPI),
its own VEN API, in ``tests/openadr3_client_ven.py`` run as a subprocess under the side venv ``.venv-openadr3``
that scripts/setup.sh makes (the client needs Python >= 3.12; the project runs on 3.11). Against a real hub
(uvicorn, SQLite, Mosquitto from broker_config, the toadr3 test's rig): the VEN discovers the token URL, gets a
token, registers, reads its programs and the notifiers, subscribes a webhook, receives an emergency by webhook and
by MQTT, reads it, posts a report that becomes its client's outcome and measurement, and never sees another VEN's
event or VEN object."""

from __future__ import annotations

import asyncio
import json
import queue
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from cloud_hub.openadr3 import BASE_PATH, BASE_PATH_30
from tests.broker_config.paho_client import TestClient
from tests.cloud_hub.openadr3_parts import Receiver, emergency, join, oadr_hub, receiver, token, wait_for
from tests.hub_fixtures import HubHandle

__all__ = ["oadr_hub", "receiver"]

ROOT = Path(__file__).resolve().parents[2]
SIDE_PYTHON = ROOT / ".venv-openadr3" / "bin" / "python"
NO_PYTHON_312 = ROOT / ".openadr3-no-python312"
VEN_PROGRAM = ROOT / "tests" / "openadr3_client_ven.py"


def _side_python() -> Path:
    """The side venv's python; a skip only where setup.sh recorded that the machine has no Python >= 3.12."""
    if SIDE_PYTHON.exists():
        return SIDE_PYTHON
    if NO_PYTHON_312.exists():
        pytest.skip(f"openadr3-client needs Python >= 3.12 and scripts/setup.sh found none on this machine "
                    f"({NO_PYTHON_312.name}); the toadr3 conformance test still runs")
    pytest.fail(f"{SIDE_PYTHON} is missing: run scripts/setup.sh (it makes the side venv with openadr3-client)")


async def _ven(hub: HubHandle, retailer: str, phase: str, **args: Any) -> dict[str, Any]:
    """One phase of the openadr3-client VEN as ``retailer`` (its hub token as the client secret); its results."""
    python = _side_python()
    proc = await asyncio.create_subprocess_exec(
        str(python), str(VEN_PROGRAM), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, cwd=str(VEN_PROGRAM.parent))
    # The scopes docs/openadr3.md names for a VEN: the client's OAuth library refuses a token whose granted
    # scope differs from the requested one (RFC 6749 3.3 lets a server grant other scopes and say so).
    body = {"phase": phase, "scopes": ["read_targets", "read_ven_objects", "write_reports", "write_subscriptions",
                                       "write_vens"], "base_url": f"{hub.url}{BASE_PATH}", "client_id": retailer,
            "client_secret": hub.tokens[retailer], **args}
    out, err = await asyncio.wait_for(proc.communicate(json.dumps(body).encode()), 60)
    assert proc.returncode == 0, err.decode()[-4000:]
    results: dict[str, Any] = json.loads(out)
    return results


def _ok(results: dict[str, Any], name: str) -> Any:
    got = results[name]
    assert "ok" in got, f"openadr3-client's {name} failed: {got}"
    return got["ok"]


def _resources(event: dict[str, Any]) -> list[str]:
    return sorted(str(v) for t in event.get("targets") or [] if t["type"] == "RESOURCE_NAME" for v in t["values"])


async def test_an_openadr3_client_ven_joins_gets_an_emergency_by_webhook_and_mqtt_reports_and_sees_only_its_own(
        oadr_hub: HubHandle, receiver: Receiver) -> None:
    hub = oadr_hub
    await join(hub, "r2")  # the second VEN (c2's retailer), registered as the toadr3 test does

    # Joining through openadr3-client: discovery, token (HTTP Basic client authentication), registration, programs,
    # notifiers, the VEN's MQTT topics, a webhook subscription.
    joined = await _ven(hub, "r1", "join", program_id="mhp-emergency", callback_url=receiver.url,
                        bearer_token="the-ven-checks-this")
    assert joined["version"] == "oadr310"
    assert _ok(joined, "auth_server")["tokenURL"] == f"{hub.url}{BASE_PATH}/auth/token"
    ven = _ok(joined, "create_ven")
    assert (ven["id"], ven["venName"], ven["clientID"]) == ("r1", "r1", "r1")
    programs = {p["id"]: p for p in _ok(joined, "programs")}
    assert set(programs) == {"mhp-tariff", "mhp-emergency", "mhp-load-shift", "mhp-load-reduction"}
    assert [d["payloadType"] for d in programs["mhp-tariff"]["payloadDescriptors"]] == ["PRICE"]
    assert [d["payloadType"] for d in programs["mhp-emergency"]["payloadDescriptors"]] == ["IMPORT_CAPACITY_LIMIT"]
    notifiers = _ok(joined, "notifiers")
    assert notifiers["WEBHOOK"] is True
    assert notifiers["MQTT"]["URIS"] == [f"mqtt://{hub.broker.host}:{hub.broker.port}"]
    assert notifiers["MQTT"]["serialization"] == "JSON"
    topics_r1 = _ok(joined, "event_topics")["topics"]
    assert topics_r1["ALL"] == "mhp/v1/retailers/r1/down/openadr3/events/+"
    sub = _ok(joined, "create_subscription")
    assert sub["id"] and sub["programID"] == "mhp-emergency"
    assert [s["id"] for s in _ok(joined, "subscriptions")] == [sub["id"]]

    mqtt_r1 = TestClient(hub.broker.host, hub.broker.port, "r1", hub.broker.identities["r1"].password)
    mqtt_r2 = TestClient(hub.broker.host, hub.broker.port, "r2", hub.broker.identities["r2"].password)
    try:
        assert not mqtt_r1.connect().is_failure and not mqtt_r2.connect().is_failure
        assert not mqtt_r1.subscribe(topics_r1["ALL"]).is_failure
        mqtt_r2.subscribe(topics_r1["ALL"])  # granted by Mosquitto, but its ACL delivers nothing of r1's to r2

        request_id, start = await emergency(hub.http, hub.auth("dso"), ["c1", "c2"])

        # By webhook: the event as r1 sees it (c1 only), with the bearer token the VEN gave.
        note = (await receiver.events(1))[0]
        assert receiver.delivered[0][0]["authorization"] == "Bearer the-ven-checks-this"
        assert note["objectType"] == "EVENT" and note["operation"] == "CREATE"
        assert note["object"]["id"] == request_id and note["object"]["programID"] == "mhp-emergency"
        assert note["object"]["targets"] == ["c1"] and '"c2"' not in json.dumps(note)  # 3.1.0's shape

        # By MQTT on the topic openadr3-client was given; r2's login got nothing of it.
        got = await asyncio.to_thread(mqtt_r1.next_message, 10)
        assert got.topic == topics_r1["CREATE"]
        pushed = json.loads(got.payload)
        assert pushed["object"]["id"] == request_id and pushed["object"]["targets"] == ["c1"]
        with pytest.raises(queue.Empty):  # r2's login receives nothing of r1's subtree
            mqtt_r2.next_message(0.3)
    finally:
        mqtt_r1.close()
        mqtt_r2.close()

    # An event of r2's alone (c2), listed for r2 before r1 looks.
    only_r2, _ = await emergency(hub.http, hub.auth("dso"), ["c2"])
    h2 = await token(hub, "r2")

    async def listed_for_r2() -> bool:
        return (await hub.http.get(f"{BASE_PATH}/events/{only_r2}", headers=h2)).status_code == 200

    await wait_for(listed_for_r2)

    # Polling with openadr3-client's own 3.1.0 API and models (get_events, get_event_by_id): the events with c1
    # only, as OpenADR 3.1.0's targets (strings), and nothing of r2's event.
    polled = await _ven(hub, "r1", "events", program_id="mhp-emergency", event_id=request_id,
                        base_url_301=f"{hub.url}{BASE_PATH_30}")
    events = _ok(polled, "events")
    ids = [e["id"] for e in events]
    assert request_id in ids and only_r2 not in ids
    assert [e["id"] for e in _ok(polled, "raw_events")] == ids
    mine = _ok(polled, "event")
    assert mine["id"] == request_id and list(mine["targets"]) == ["c1"], mine
    assert [list(e["targets"]) for e in events if e["id"] == request_id] == [["c1"]]
    assert [e["id"] for e in _ok(polled, "raw_events_of_program")] == [request_id]
    event = _ok(polled, "raw_event")
    assert event["id"] == request_id and event["targets"] == ["c1"]
    assert event["intervals"][0]["payloads"][0]["type"] == "IMPORT_CAPACITY_LIMIT"
    assert event["intervals"][0]["payloads"][0]["values"] == [2.5]
    assert '"c2"' not in json.dumps(polled)
    # Its OpenADR 3.0.1 VEN (3.0's targets) reads the same events at /openadr3/3.0.1 with its own API and models.
    assert [(e["id"], _resources(e)) for e in _ok(polled, "events_301")] == [(request_id, ["c1"])]
    assert _ok(polled, "event_301")["id"] == request_id

    # Another VEN's objects by id: refused (403 or the 404 that hides them), and the refusal carries none of them.
    probe = await _ven(hub, "r1", "probe", event_id=only_r2, ven_id="r2")
    assert probe["event"].get("status") in (403, 404), probe
    assert probe["ven"].get("status") in (403, 404), probe
    assert '"c2"' not in json.dumps(probe)

    # A report built with openadr3-client's models: the hub's outcome and measurement for c1.
    reported = await _ven(hub, "r1", "report", program_id="mhp-emergency", event_id=request_id, resources=["c1"],
                          demand_kw=2.25)
    stored = _ok(reported, "create_report")
    assert stored["id"] and stored["eventID"] == request_id and stored["clientID"] == "r1"
    assert [r["id"] for r in _ok(reported, "reports")] == [stored["id"]]

    async def executed() -> bool:
        r = await hub.http.get(f"/v1/requests/{request_id}", headers=hub.auth("dso"))
        return bool(r.json()["clients"]["c1"]["state"] == "executed")

    await wait_for(executed)
    at = datetime.fromisoformat(reported["at"])
    series = (await hub.http.get("/v1/measurements", headers=hub.auth("dso"), params={
        "client_id": "c1", "from": (at - timedelta(minutes=1)).isoformat(),
        "to": (at + timedelta(minutes=1)).isoformat()})).json()["series"]
    assert [(s["active_power_kw"], s["retailer_id"]) for s in series] == [(2.25, "r1")]
    r2_reports = (await hub.http.get(f"{BASE_PATH}/reports", headers=h2)).json()
    assert r2_reports == [], "r2 sees none of r1's reports"
    assert start > datetime.now(UTC), "all of it happened before the emergency began"


async def test_the_token_endpoint_takes_http_basic_client_authentication(oadr_hub: HubHandle) -> None:
    """RFC 6749 2.3.1: a server MUST accept HTTP Basic for a client with a password (openadr3-client sends only
    that); credentials in both the header and the body are refused (2.3: one method per request); a wrong or
    undecodable one is ``invalid_client``."""
    hub = oadr_hub
    url = f"{BASE_PATH}/auth/token"
    form = {"grant_type": "client_credentials"}
    ok = await hub.http.post(url, data=form, auth=("r1", hub.tokens["r1"]))
    assert ok.status_code == 200, ok.text
    assert ok.json()["access_token"] == hub.tokens["r1"] and ok.json()["token_type"] == "Bearer"
    events = await hub.http.get(f"{BASE_PATH}/events", headers={"Authorization": f"Bearer {ok.json()['access_token']}"})
    assert events.status_code == 200, events.text
    both = await hub.http.post(url, data={**form, "client_secret": hub.tokens["r1"]}, auth=("r1", hub.tokens["r1"]))
    assert both.status_code == 400 and both.json()["error"] == "invalid_request", both.text
    for auth in (("r2", hub.tokens["r1"]), ("r1", "not-a-token")):
        r = await hub.http.post(url, data=form, auth=auth)
        assert r.status_code == 401 and r.json()["error"] == "invalid_client", r.text
    garbled = await hub.http.post(url, data=form, headers={"Authorization": "Basic %%%not-base64"})
    assert garbled.status_code == 401 and garbled.json()["error"] == "invalid_client", garbled.text
