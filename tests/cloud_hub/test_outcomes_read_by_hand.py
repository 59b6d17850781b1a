"""The hub reads a retailer's plain ``outcomes`` message by hand (``mhp_wire.fastwire.read_outcomes``, issue 14
ninth round) and everything else with the models, against a real Mosquitto and a real hub on SQLite: a plain
message is applied with the values the models would give it, and a message with one bad entry is handled exactly as
before (the bad entry refused alone, naming it; the rest applied; the message acknowledged once)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from mhp_wire import topics
from mhp_wire.fastwire import OutcomesIn, Report, outcomes_payload, sent_at_json
from mhp_wire.messages import ClientState, Outcomes, decode
from tests.cloud_hub.test_outcomes_batched import answered
from tests.cloud_hub.test_relay import metric, post_emergency
from tests.cloud_hub.test_relay_batching import Retailer, retailers
from tests.hub_fixtures import HubHandle


async def publish(party: Retailer, payload: bytes) -> None:
    await party.link.publish(topics.up("retailers", party.retailer_id), payload, wait_s=10.0)


async def test_a_plain_outcomes_message_is_read_by_hand_and_one_with_a_bad_entry_is_handled_as_before(
        hub: HubHandle) -> None:
    mine = [f"c{i:02d}" for i in range(8)]
    await hub.setup_registry({**dict.fromkeys(mine, "r1"), "other": "r2"})
    router = hub.app.state.relay.inbound
    read, seen = router.decode, []

    def watched(payload: bytes) -> Any:  # what the hub's router made of each outcomes message, unchanged
        msg = read(payload)
        if isinstance(msg, Outcomes | OutcomesIn):
            seen.append(type(msg))
        return msg

    router.decode = watched
    async with retailers(hub, "r1", "r2") as (r1, _):
        request_id = await post_emergency(hub, [*mine, "other"])
        await r1.request_for(request_id)
        before = metric((await hub.http.get("/metrics")).text, "mhp_outcome_batch_size_count")

        # As the bridge writes it: read by hand, applied with the models' values (a trace's whole number a float).
        detail = {"shed": ["heater", "ev"], "measured_kw": 1.25, "n": 3, "meter_available": True, "reason": None}
        plain_id, plain = outcomes_payload(request_id, [
            Report(request_id, c, ClientState.EXECUTED, detail, {"gateway_ms": 0.5, "retailer_ms": 2}, 1)
            for c in mine[:4]])
        await publish(r1, plain)
        await answered(r1, plain_id, errors=0)
        assert seen == [OutcomesIn]
        model = decode(plain)
        assert isinstance(model, Outcomes) and model.reports[0].trace == {"gateway_ms": 0.5, "retailer_ms": 2.0}

        # One bad entry, a spelling only the models take (revision 1.0) and another retailer's client: the models
        # decode it, the bad entry and the foreign client are refused alone, the rest applied, one ack.
        bad = json.dumps({"v": 1, "msg_id": "bad-1", "sent_at": json.loads(sent_at_json()), "type": "outcomes",
                          "request_id": request_id, "reports": [
                              {"client_id": mine[4], "state": "executed"},
                              {"client_id": mine[5], "state": "bogus"},
                              {"client_id": mine[6], "state": "executed", "revision": 1.0},
                              {"client_id": "other", "state": "executed"}]}, separators=(",", ":")).encode()
        await publish(r1, bad)
        await answered(r1, "bad-1", errors=2)
        assert seen == [OutcomesIn, Outcomes]
        refusals = sorted((e.code, e.ref_msg_id, e.message) for e in r1.errors)
        assert [(code, ref) for code, ref, _ in refusals] == [("forbidden", "bad-1"), ("invalid", "bad-1")]
        assert refusals[0][2].startswith("outcomes entry 3 (client other): ")
        assert refusals[1][2].startswith("outcomes entry 1: state: ")

        # The plain message again (a bridge that missed the ack): acknowledged again, nothing changes.
        await publish(r1, plain)
        await answered(r1, plain_id, errors=2)
        for _ in range(200):
            if r1.acked()[plain_id] == 2:
                break
            await asyncio.sleep(0.05)
        assert r1.acked() == {plain_id: 2, "bad-1": 1} and len(r1.errors) == 2
        assert seen == [OutcomesIn, Outcomes, OutcomesIn]

        view = (await hub.http.get(f"/v1/requests/{request_id}", headers=hub.auth("dso"))).json()
        states = {c: view["clients"][c]["state"] for c in [*mine, "other"]}
        assert [c for c, s in states.items() if s == "executed"] == [*mine[:5], mine[6]], states
        assert view["clients"][mine[0]]["detail"] == detail
        text = (await hub.http.get("/metrics")).text
        assert metric(text, "mhp_outcome_batch_size_count") == before + 3, "each message in one commit"
        assert metric(text, "mhp_mqtt_rejected_total", reason="invalid") == 1
        assert metric(text, "mhp_mqtt_rejected_total", reason="forbidden") == 1
        assert metric(text, "mhp_mqtt_received_total", type="outcomes") == 3
