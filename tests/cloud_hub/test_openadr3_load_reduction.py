"""A two-phase load reduction through the OpenADR 3 door, with toadr3 as the VENs: both are asked, one answers
available (``DOWN_REGULATION_AVAILABLE``), the hub disconnects only that one's client (the VEN is told
``UPDATE``, the other ``DELETE``), the VEN reports it executed and the request completes — as with bridges."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from toadr3.models import (
    Interval,
    ObjectOperation,
    ObjectType,
    OperationType,
    Report,
    ReportData,
    Subscription,
    ValuesMap,
)

from tests.cloud_hub.openadr3_parts import Receiver, join, oadr_hub, receiver, ven, wait_for
from tests.hub_fixtures import HubHandle

__all__ = ["oadr_hub", "receiver"]


def _payload(report_type: str, value: object) -> list[Interval]:
    return [Interval(id=0, payloads=[ValuesMap(type=report_type, values=[value])])]  # type: ignore[list-item]


async def test_both_vens_are_asked_and_only_the_available_clients_vens_are_dispatched(oadr_hub: HubHandle,
                                                                                   receiver: Receiver) -> None:
    hub = oadr_hub
    await join(hub, "r1", "r2")
    async with ven(hub, "r1") as v1, ven(hub, "r2") as v2:
        for client, name in ((v1, "ven-r1"), (v2, "ven-r2")):
            await client.post_subscription(Subscription(
                client_name=name, program_id="mhp-load-reduction", object_operations=[ObjectOperation(
                    objects=[ObjectType.EVENT], operations=[OperationType.POST, OperationType.PUT,
                                                            OperationType.DELETE],
                    callback_url=receiver.url, bearer_token=name)]))
        start = datetime.now(UTC) + timedelta(minutes=2)
        r = await hub.http.post("/v1/load-reductions", headers=hub.auth("dso"), json={
            "client_ids": ["c1", "c2"], "reduction_kw": 2.0, "start": start.isoformat(), "duration_s": 600,
            "respond_within_s": 3.0})  # time enough for r1's answer on a loaded machine
        assert r.status_code == 202, r.text
        rid = r.json()["request_id"]

        def notes() -> list[tuple[str, str, list[str]]]:
            out = []
            for headers, body in receiver.delivered:
                n = json.loads(body)
                resources = [v for t in n["object"]["targets"] if t["type"] == "RESOURCE_NAME" for v in t["values"]]
                out.append((headers["authorization"].removeprefix("Bearer "), n["operation"], resources))
            return out

        async def asked() -> bool:
            return sorted(notes()[:2]) == [("ven-r1", "CREATE", ["c1"]), ("ven-r2", "CREATE", ["c2"])]

        await wait_for(asked)
        first = json.loads(receiver.delivered[0][1])["object"]
        assert first["intervals"][0]["payloads"][0] == {"type": "DISPATCH_SETPOINT_RELATIVE", "values": [-2.0]}
        assert first["reportDescriptors"][0]["payloadType"] == "DOWN_REGULATION_AVAILABLE"

        # Phase one: r1 says c1 can shed 3 kW; r2 says nothing.
        events = [e for e in await v1.get_events(program_id="mhp-load-reduction") if e.id == rid]
        await v1.post_report(Report(program_id="mhp-load-reduction", event_id=rid, client_name="ven-r1", resources=[
            ReportData(resource_name="c1", intervals=_payload("DOWN_REGULATION_AVAILABLE", 3.0))]))
        assert len(events) == 1

        # Phase two (after respond_within_s): c1 is disconnected; r1 is told UPDATE, r2 DELETE.
        async def dispatched() -> bool:
            return sorted(notes())[1:] == [("ven-r1", "UPDATE", ["c1"]), ("ven-r2", "CREATE", ["c2"]),
                                           ("ven-r2", "DELETE", ["c2"])]

        await wait_for(dispatched, timeout=15)
        assert [e.id for e in await v2.get_events(program_id="mhp-load-reduction")] == []
        await v1.post_report(Report(program_id="mhp-load-reduction", event_id=rid, client_name="ven-r1", resources=[
            ReportData(resource_name="c1", intervals=_payload("X_MHP_OUTCOME", "executed"))]))

        async def completed() -> dict[str, object] | None:
            got = (await hub.http.get(f"/v1/requests/{rid}", headers=hub.auth("dso"))).json()
            return got if got["state"] in ("completed", "partially_completed") else None

        req = await wait_for(completed)
        assert req["clients"]["c1"]["state"] == "executed"  # type: ignore[index]
        assert req["clients"]["c2"]["state"] == "unreachable"  # type: ignore[index]
        assert req["selection"]["chosen"] == ["c1"]  # type: ignore[index]
