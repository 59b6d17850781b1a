"""The OpenADR 3 facade in both versions' shapes (issue 17): ``/openadr3/3.1.0`` answers and takes ``targets`` as
OpenADR 3.1.0's list of strings (client ids), ``/openadr3/3.0.1`` as OpenADR 3.0's ``{type, values}`` objects; an
object in the other version's shape is refused (422) and nothing of it is stored. The mapping's table first, then
a real hub (uvicorn, SQLite, Mosquitto from broker_config) and a real webhook receiver."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from cloud_hub.openadr3 import BASE_PATH, BASE_PATH_30, mapping
from tests.broker_config.paho_client import TestClient
from tests.cloud_hub.openadr3_parts import Receiver, emergency, join, oadr_hub, receiver, token, wait_for
from tests.hub_fixtures import HubHandle

__all__ = ["oadr_hub", "receiver"]

V31, V30 = mapping.SPEC_VERSION, mapping.SPEC_VERSION_30
HUB_TARGETS = [{"type": "RESOURCE_NAME", "values": ["c1", "c2"]}, {"type": "VEN_NAME", "values": ["r1"]}]

OUT_CASES = [
    # (the hub's targets, version, answered targets)
    (HUB_TARGETS, V31, ["c1", "c2"]),
    (HUB_TARGETS, V30, HUB_TARGETS),
    ([], V31, []),
    ([], V30, []),
    (None, V31, None),
    ([{"type": "VEN_NAME", "values": ["r1"]}], V31, []),
    ([{"type": "RESOURCE_NAME", "values": ["c1"]}, {"type": "RESOURCE_NAME", "values": ["c3"]}], V31, ["c1", "c3"]),
]


@pytest.mark.parametrize(("targets", "version", "want"), OUT_CASES)
def test_targets_out_by_version(targets: list[Any] | None, version: str, want: list[Any] | None) -> None:
    assert mapping.targets_out(targets, version) == want


IN_CASES = [
    # (incoming targets, version, the hub's targets or the error's words)
    (["c1", "c2"], V31, [{"type": "RESOURCE_NAME", "values": ["c1", "c2"]}]),
    ([], V31, []),
    (None, V31, None),
    ([{"type": "RESOURCE_NAME", "values": ["c1"]}], V31, "use /openadr3/3.0.1"),
    (["c1", {"type": "RESOURCE_NAME", "values": ["c2"]}], V31, "use /openadr3/3.0.1"),
    ([{"type": "RESOURCE_NAME", "values": ["c1"]}], V30, [{"type": "RESOURCE_NAME", "values": ["c1"]}]),
    (["c1"], V30, "use /openadr3/3.1.0"),
    ([{"type": "RESOURCE_NAME", "values": "c1"}], V30, "use /openadr3/3.1.0"),
]


@pytest.mark.parametrize(("targets", "version", "want"), IN_CASES)
def test_targets_in_by_version(targets: list[Any] | None, version: str, want: Any) -> None:
    if isinstance(want, str):
        with pytest.raises(mapping.MappingError, match=want):
            mapping.targets_in(targets, version)
    else:
        assert mapping.targets_in(targets, version) == want


def _new_event(targets: list[Any]) -> dict[str, Any]:
    start = datetime.now(UTC) + timedelta(minutes=5)
    return {"programID": "mhp-emergency", "targets": targets,
            "intervalPeriod": {"start": start.isoformat(), "duration": "PT15M"},
            "intervals": [{"id": 0, "payloads": [{"type": "IMPORT_CAPACITY_LIMIT", "values": [3.0]}]}]}


async def _event_ids(hub: HubHandle, base: str) -> list[str]:
    r = await hub.http.get(f"{base}/events", headers=hub.auth("dso"))
    assert r.status_code == 200, r.text
    return [e["id"] for e in r.json()]


async def test_one_event_in_each_versions_shape(oadr_hub: HubHandle) -> None:
    hub = oadr_hub
    await join(hub, "r1", "r2")
    h1 = await token(hub, "r1")
    request_id, _ = await emergency(hub.http, hub.auth("dso"), ["c1", "c2"])

    async def listed() -> bool:
        return (await hub.http.get(f"{BASE_PATH}/events/{request_id}", headers=h1)).status_code == 200

    await wait_for(listed)
    v31 = (await hub.http.get(f"{BASE_PATH}/events/{request_id}", headers=h1)).json()
    v30 = (await hub.http.get(f"{BASE_PATH_30}/events/{request_id}", headers=h1)).json()
    assert v31["targets"] == ["c1"]
    assert v30["targets"] == [{"type": "RESOURCE_NAME", "values": ["c1"]}, {"type": "VEN_NAME", "values": ["r1"]}]
    assert {k: v for k, v in v31.items() if k != "targets"} == {k: v for k, v in v30.items() if k != "targets"}
    listed31 = [e for e in (await hub.http.get(f"{BASE_PATH}/events", headers=h1)).json() if e["id"] == request_id]
    assert [e["targets"] for e in listed31] == [["c1"]]
    # The DSO (issuer) sees every client, in each shape.
    dso31 = (await hub.http.get(f"{BASE_PATH}/events/{request_id}", headers=hub.auth("dso"))).json()
    dso30 = (await hub.http.get(f"{BASE_PATH_30}/events/{request_id}", headers=hub.auth("dso"))).json()
    assert dso31["targets"] == ["c1", "c2"]
    assert dso30["targets"] == [{"type": "RESOURCE_NAME", "values": ["c1", "c2"]}]
    # 3.0's target filter still answers at 3.0.1.
    filtered = (await hub.http.get(f"{BASE_PATH_30}/events", headers=h1, params={
        "targetType": "RESOURCE_NAME", "targetValues": "c1"})).json()
    assert request_id in [e["id"] for e in filtered]
    # Each base path names its own token endpoint.
    for base in (BASE_PATH, BASE_PATH_30):
        server = (await hub.http.get(f"{base}/auth/server")).json()
        assert server["tokenURL"] == f"{hub.url}{base}/auth/token"


async def test_a_dsos_event_is_taken_in_its_paths_shape_and_refused_in_the_other(oadr_hub: HubHandle) -> None:
    hub = oadr_hub
    dso = hub.auth("dso")
    before = await _event_ids(hub, BASE_PATH)
    # The other version's shape: a clear 422 naming the right path, and no request made.
    wrong31 = await hub.http.post(f"{BASE_PATH}/events", headers=dso,
                                  json=_new_event([{"type": "RESOURCE_NAME", "values": ["c1"]}]))
    assert wrong31.status_code == 422 and BASE_PATH_30 in wrong31.json()["message"], wrong31.text
    wrong30 = await hub.http.post(f"{BASE_PATH_30}/events", headers=dso, json=_new_event(["c1"]))
    assert wrong30.status_code == 422 and BASE_PATH in wrong30.json()["message"], wrong30.text
    assert await _event_ids(hub, BASE_PATH) == before
    # Each in its own shape: created, answered in the same shape, one hub request each.
    made31 = await hub.http.post(f"{BASE_PATH}/events", headers=dso, json=_new_event(["c1", "c2"]))
    assert made31.status_code == 201, made31.text
    assert made31.json()["targets"] == ["c1", "c2"]
    made30 = await hub.http.post(f"{BASE_PATH_30}/events", headers=dso,
                                 json=_new_event([{"type": "RESOURCE_NAME", "values": ["c2"]}]))
    assert made30.status_code == 201, made30.text
    assert made30.json()["targets"] == [{"type": "RESOURCE_NAME", "values": ["c2"]}]
    for made, clients in ((made31, {"c1", "c2"}), (made30, {"c2"})):
        req = (await hub.http.get(f"/v1/requests/{made.json()['id']}", headers=dso)).json()
        assert req["type"] == "emergency" and set(req["clients"]) == clients
    # 3.1.0's targets filter: every string named must be among the event's (at either path).
    async def ids(**params: Any) -> list[str]:
        r = await hub.http.get(f"{BASE_PATH}/events", headers=dso, params=params)
        assert r.status_code == 200, r.text
        return [e["id"] for e in r.json()]

    made = {made31.json()["id"], made30.json()["id"]}
    assert made & set(await ids(targets="c1")) == {made31.json()["id"]}
    assert made & set(await ids(targets=["c1", "c2"])) == {made31.json()["id"]}
    assert made & set(await ids(targets="c2")) == made
    assert await ids(targets="c3") == []
    # Cancelled at one path, answered in that path's shape.
    gone = await hub.http.delete(f"{BASE_PATH}/events/{made30.json()['id']}", headers=dso)
    assert gone.status_code == 200 and gone.json()["targets"] == ["c2"], gone.text


async def test_a_subscriptions_targets_in_each_versions_shape(oadr_hub: HubHandle, receiver: Receiver) -> None:
    hub = oadr_hub
    await join(hub, "r1")
    h1 = await token(hub, "r1")
    ops = [{"objects": ["EVENT"], "operations": ["POST"], "callbackUrl": receiver.url}]
    wrong = await hub.http.post(f"{BASE_PATH}/subscriptions", headers=h1, json={
        "clientName": "ven-r1", "objectOperations": ops, "targets": [{"type": "RESOURCE_NAME", "values": ["c1"]}]})
    assert wrong.status_code == 422 and BASE_PATH_30 in wrong.json()["message"], wrong.text
    assert (await hub.http.get(f"{BASE_PATH}/subscriptions", headers=h1)).json() == []
    made = await hub.http.post(f"{BASE_PATH}/subscriptions", headers=h1, json={
        "clientName": "ven-r1", "objectOperations": ops, "targets": ["c1"]})
    assert made.status_code == 201 and made.json()["targets"] == ["c1"], made.text
    sid = made.json()["id"]
    seen30 = (await hub.http.get(f"{BASE_PATH_30}/subscriptions/{sid}", headers=h1)).json()
    assert seen30["targets"] == [{"type": "RESOURCE_NAME", "values": ["c1"]}]
    assert [s["targets"] for s in (await hub.http.get(f"{BASE_PATH}/subscriptions", headers=h1)).json()] == [["c1"]]


async def test_notifications_carry_targets_in_the_shape_of_the_version_registered_or_subscribed_with(
        oadr_hub: HubHandle, receiver: Receiver) -> None:
    """r1 registers and subscribes at 3.1.0, r2 at 3.0.1: each is notified (MQTT, webhook) in its own shape."""
    hub = oadr_hub
    bases = {"r1": BASE_PATH, "r2": BASE_PATH_30}
    mqtt: dict[str, TestClient] = {}
    try:
        for ven, base in bases.items():
            h = await token(hub, ven)
            assert (await hub.http.post(f"{base}/vens", headers=h, json={"venName": ven})).status_code == 201
            r = await hub.http.post(f"{base}/subscriptions", headers=h, json={
                "clientName": f"ven-{ven}", "objectOperations": [{"objects": ["EVENT"], "operations": ["CREATE"],
                                                                 "callbackUrl": receiver.url, "bearerToken": ven}]})
            assert r.status_code == 201, r.text
            all_topic = (await hub.http.get(f"{base}/notifiers/mqtt/topics/vens/{ven}/events", headers=h)
                         ).json()["topics"]["ALL"]
            client = TestClient(hub.broker.host, hub.broker.port, ven, hub.broker.identities[ven].password)
            mqtt[ven] = client
            assert not client.connect().is_failure and not client.subscribe(all_topic).is_failure
        request_id, _ = await emergency(hub.http, hub.auth("dso"), ["c1", "c2"])
        want = {"r1": ["c1"],
                "r2": [{"type": "RESOURCE_NAME", "values": ["c2"]}, {"type": "VEN_NAME", "values": ["r2"]}]}
        for ven, client in mqtt.items():
            pushed = json.loads((await asyncio.to_thread(client.next_message, 10)).payload)
            assert pushed["object"]["id"] == request_id and pushed["object"]["targets"] == want[ven], pushed
        await receiver.events(2)
        hooked = {h["authorization"].removeprefix("Bearer "): json.loads(b)["object"] for h, b in receiver.delivered}
        assert {ven: obj["targets"] for ven, obj in hooked.items()} == want
    finally:
        for client in mqtt.values():
            client.close()
