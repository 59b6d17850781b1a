"""A request revised, then its client's supplier switched before it starts: the old retailer's bridge withdraws the
command it holds, and its ``refused`` outcome must count at the hub — it answers the revision the bridge holds, not
revision 1, or the hub takes it for a stale answer and leaves the client open until its deadline. Through the real
chain of tests/test_customer_changes.py (hub, hub broker, two bridges with their own brokers, gateways as parties)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from mhp_wire import topics
from mhp_wire.messages import Ack, Command
from tests.broker_fixtures import MosquittoFactory
from tests.mqtt_party import Party, parties
from tests.test_customer_changes import world
from tests.waiting import eventually


async def test_a_revised_command_withdrawn_at_a_supplier_switch_is_refused_at_the_hub(
        tmp_path: Path, mosquitto_factory: MosquittoFactory) -> None:
    async with world(tmp_path, mosquitto_factory) as w:
        hub = w.hub
        assert hub is not None
        dso = hub.auth("dso")
        await w.start_bridge("r1")
        await w.start_bridge("r2")
        with parties(Party(w.local["r1"], "gw-1", topics.down("gateways", "gw-1"))) as (gw1,):
            start = datetime.now(UTC) + timedelta(seconds=40)
            r = await hub.http.post("/v1/emergencies", headers=dso, json={
                "client_ids": ["c-move"], "start": start.isoformat(), "duration_s": 60, "power_limit_kw": 2.0})
            assert r.status_code == 202, r.text
            emergency = r.json()["request_id"]
            first = await gw1.next("command", timeout=10)
            await gw1.publish(topics.up("gateways", "gw-1"), Ack(ack_ids=[first.msg_id]))
            r = await hub.http.post(f"/v1/requests/{emergency}/revise", headers=dso, json={"power_limit_kw": 1.0})
            assert r.status_code == 202 and r.json()["revision"] == 2, r.text
            second = await gw1.next("command", timeout=10)
            assert isinstance(second, Command) and second.revision == 2
            await gw1.publish(topics.up("gateways", "gw-1"), Ack(ack_ids=[second.msg_id]))
            # r2 supplies c-move from before the (revised) emergency starts: r1 withdraws revision 2.
            r = await hub.http.put("/v1/clients/c-move", headers=dso, json={
                "retailer_id": "r2", "contracted_power_kw": 6.9,
                "valid_from": (start - timedelta(seconds=20)).isoformat()})
            assert r.status_code == 200, r.text
            cancel = await gw1.next("cancel", timeout=10)
            assert cancel.request_id == emergency  # type: ignore[union-attr]
            got: dict[str, Any] = {}

            async def refused_at_the_hub() -> bool:
                got.update((await hub.http.get(f"/v1/requests/{emergency}", headers=dso)).json())
                return bool(got["clients"]["c-move"]["state"] == "refused")

            await eventually(refused_at_the_hub, "the withdrawn revision-2 command's client refused at the hub",
                             timeout_s=15)
            assert got["clients"]["c-move"]["revision"] == 2
            assert "supplier change" in got["clients"]["c-move"]["detail"]["reason"]
