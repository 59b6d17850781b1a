"""The personal area's consent section against a real bridge on real brokers (the hub played by a test party):
a customer sees only their own requests, in plain words with every value escaped; a decision leaves through the
bridge's outbox towards the hub as a ``consent_decision`` for the customer of the session, never for another."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

from mhp_wire import topics
from mhp_wire.messages import Ack, ConsentDecision, ConsentItem, ConsentView
from retailer_bridge.consent import access_line, consent_section, describe, parse_decision
from tests.broker_fixtures import MosquittoFactory
from tests.mqtt_party import Party, parties
from tests.retailer_bridge.personal_area_rig import ALICE, BOB, csrf_of, customer, home, running_area


def item(pid: str, state: str = "sent_to_pa", purpose: str = "a heat-pump offer") -> ConsentItem:
    now = datetime.now(UTC)
    return ConsentItem(permission_id=pid, party_id="p1", party_name="Energy <b>Co</b>", purpose=purpose,
                       scopes=["consumption_profile", "live_measurements"], resolution_s=3600,
                       data_from=now - timedelta(days=30), data_to=now, valid_until=now + timedelta(days=10),
                       decide_by=now + timedelta(days=3), state=state)  # type: ignore[arg-type]


def test_a_request_in_plain_words() -> None:
    text = describe(item("perm-1"))
    assert text.startswith("Energy <b>Co</b> asks to see your electricity consumption over time and the live power "
                           "measurements of your home, per hour, from ")
    assert "for this purpose: “a heat-pump offer”. It could read it until " in text and text.endswith(" UTC.")


def test_the_section_escapes_what_a_party_wrote_and_offers_the_decisions_that_apply() -> None:
    view = ConsentView(client_id="c1", permissions=[item("perm-1", purpose='<script>alert("x")</script>'),
                                                    item("perm-2", "accepted"), item("perm-3", "timed_out")],
                       accesses=[])
    html = consent_section(view, "tok")
    assert "<script>" not in html and "<b>Co</b>" not in html and "&lt;script&gt;" in html
    assert 'id="accept-perm-1"' in html and 'id="reject-perm-1"' in html and 'id="revoke-perm-1"' not in html
    assert 'id="revoke-perm-2"' in html and 'id="accept-perm-2"' not in html
    assert "not answered in time: it lapsed" in html and 'id="accept-perm-3"' not in html
    assert "Nobody yet." in html
    assert "has not answered yet" in consent_section(None, "tok")


def test_access_lines_and_decisions() -> None:
    assert access_line("party:p1", "read_consumption", "party:permission:x", True) == \
        "party:p1 read your consumption under the right “party:permission:x”"
    assert access_line("party:p1", "read_consumption", "none", False) == "party:p1: refused (read your consumption)"
    assert access_line("clock", "permission_time_out", "clock", True) == \
        "clock: a request for your data was not answered in time: it lapsed"
    assert access_line("you (in your supplier's personal area)", "permission_accept", "x", True) == \
        "you (in your supplier's personal area): a request for your data was allowed"
    assert [parse_decision({"decision": d}) for d in ("accept", "reject", "revoke", "delete", "")] == [
        "accept", "reject", "revoke", None, None]


async def test_a_decision_goes_to_the_hub_for_the_customer_of_the_session_only(
        tmp_path: Path, mosquitto_factory: MosquittoFactory) -> None:
    async with running_area(tmp_path, mosquitto_factory) as rig:
        with parties(Party(rig.hub_broker, "hub", topics.all_up("retailers"))) as (hub,):
            await hub.publish(topics.down("retailers", "r1"), ConsentView(
                client_id="c1", permissions=[item("perm-1")], accesses=[]))
            for _ in range(200):
                if "c1" in rig.area.consent.views:
                    break
                await asyncio.sleep(0.02)
            async with customer(rig, BOB) as bob:
                page, csrf = await home(bob)
                assert "perm-1" not in page and "has not answered yet" in page
                r = await bob.post("/consent/perm-1", data={"csrf": csrf, "decision": "accept"})
                assert r.status_code == 404, "not Bob's request: nothing is sent"
            async with customer(rig, ALICE) as alice:
                page, csrf = await home(alice)
                assert 'data-state="sent_to_pa"' in page and "Energy &lt;b&gt;Co&lt;/b&gt; asks to see" in page
                r = await alice.post("/consent/perm-1", data={"csrf": "wrong", "decision": "accept"})
                assert r.status_code == 403
                r = await alice.post("/consent/perm-1", data={"csrf": csrf, "decision": "delete"})
                assert r.status_code == 404
                r = await alice.post("/consent/perm-1", data={"csrf": csrf, "decision": "accept"})
                assert (r.status_code, r.headers["location"]) == (303, "/?decided=accept")
                page = (await alice.get("/?decided=accept")).text
                assert "Sent: you allowed it." in page
                assert csrf_of(page) == csrf
            got = await hub.next("consent_decision", timeout=5)
            assert isinstance(got, ConsentDecision)
            assert (got.client_id, got.permission_id, got.decision) == ("c1", "perm-1", "accept")
            await hub.nothing("consent_decision", within=0.3)  # Bob's refused post sent nothing


async def test_a_decision_is_sent_again_until_the_hub_acknowledges_it(
        tmp_path: Path, mosquitto_factory: MosquittoFactory) -> None:
    async with running_area(tmp_path, mosquitto_factory) as rig:
        rig.bridge.relay.hub_retry_s = 0.3  # the first re-send after 0.3 s instead of 5 s
        with parties(Party(rig.hub_broker, "hub", topics.all_up("retailers"))) as (hub,):
            await hub.publish(topics.down("retailers", "r1"), ConsentView(
                client_id="c1", permissions=[item("perm-1", "accepted")], accesses=[]))
            for _ in range(200):
                if "c1" in rig.area.consent.views:
                    break
                await asyncio.sleep(0.02)
            async with customer(rig, ALICE) as alice:
                _, csrf = await home(alice)
                r = await alice.post("/consent/perm-1", data={"csrf": csrf, "decision": "revoke"})
                assert r.status_code == 303
            first = await hub.next("consent_decision", timeout=5)
            again = await hub.next("consent_decision", timeout=5)  # not acknowledged: sent again
            assert isinstance(first, ConsentDecision) and first.decision == "revoke"
            assert again.msg_id == first.msg_id

            async def queued() -> list[str]:
                return [row["msg_id"] for row in await rig.bridge.store.due_outbox(float("inf"))]

            assert first.msg_id in await queued(), "kept until the hub acknowledges it"
            await hub.publish(topics.down("retailers", "r1"), Ack(ack_ids=[first.msg_id]))
            for _ in range(200):
                if first.msg_id not in await queued():
                    break
                await asyncio.sleep(0.02)
            assert first.msg_id not in await queued(), "acknowledged: out of the outbox"
