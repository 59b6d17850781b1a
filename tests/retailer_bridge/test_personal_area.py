"""The customers' personal area over real HTTP, against a real bridge between two real Mosquittos; the gateways
are paho test parties. Plus the pure parts (the form, the throttle) as tables of cases."""

from __future__ import annotations

import asyncio
import hashlib
import re
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from mhp_wire import topics
from mhp_wire.messages import Ack, ApplianceSchedule, Schedule
from retailer_bridge.accounts import (
    Accounts,
    FailureRecord,
    ScryptCost,
    ThrottlePolicy,
    after_failure,
    hash_password,
    locked_for,
    verify_password,
)
from retailer_bridge.cli import main as bridge_cli
from retailer_bridge.personal_area import (
    PersonalArea,
    parse_appliance_form,
    parse_windows,
    schedule_status,
    switchable,
)
from retailer_bridge.relay import BridgeRelay
from retailer_bridge.settings import BridgeSettings
from retailer_bridge.store import BridgeStore
from tests.broker_fixtures import MosquittoFactory
from tests.mqtt_party import Party, parties
from tests.retailer_bridge.personal_area_rig import (
    ALICE,
    BOB,
    CHEAP_SCRYPT_N,
    AreaRig,
    csrf_of,
    customer,
    home,
    running_area,
    sign_in,
)

HEATER = {"windows": "22:00-07:00", "hours": "2", "max_interruption_min": "30", "priority": "2"}


@pytest.fixture
async def rig(tmp_path: Path, mosquitto_factory: MosquittoFactory) -> AsyncIterator[AreaRig]:
    async with running_area(tmp_path, mosquitto_factory) as r:
        yield r


def status_of(page: str) -> str:
    m = re.search(r'id="schedule-status" data-status="(\w+)"', page)
    assert m, "no schedule status on the page"
    return m[1]


# -- signing in ------------------------------------------------------------------------------------------------


async def test_a_wrong_password_is_refused_and_repeats_lock_the_account(rig: AreaRig) -> None:
    async with customer(rig) as client:
        first = await sign_in(client, ALICE[1], "not her password")
        assert first.status_code == 401 and "Wrong e-mail or password." in first.text
        assert "mhp_session" not in client.cookies
        unknown = await sign_in(client, "nobody@example.com", "whatever it is")
        assert unknown.status_code == 401 and "Wrong e-mail or password." in unknown.text, "no account enumeration"
        answers = [(await sign_in(client, ALICE[1], f"guess number {i}")).status_code for i in range(4)]
        assert answers == [401, 401, 401, 429], "the fifth failure locks the account"
        locked = await sign_in(client, ALICE[1], ALICE[2])
        assert locked.status_code == 429 and "Too many failed sign-ins" in locked.text
        assert 0 < int(locked.headers["retry-after"]) <= 300
        assert "mhp_session" not in client.cookies, "not even the right password gets in while locked"
    async with customer(rig, BOB):
        pass  # another account from the same address still signs in


async def test_the_sign_in_form_needs_its_csrf_token(rig: AreaRig) -> None:
    async with customer(rig) as client:
        forged = await client.post("/login", data={"email": ALICE[1], "password": ALICE[2]})
        assert forged.status_code == 403 and "mhp_session" not in client.cookies
        await client.get("/login")
        forged = await client.post("/login", data={"csrf": "made-up", "email": ALICE[1], "password": ALICE[2]})
        assert forged.status_code == 403 and "mhp_session" not in client.cookies


async def test_pages_need_a_session_and_carry_the_security_headers(rig: AreaRig) -> None:
    async with customer(rig) as client:
        for path in ("/", "/?saved=heater"):
            answer = await client.get(path)
            assert answer.status_code == 303 and answer.headers["location"] == "/login"
        assert (await client.post("/appliances/heater", data=HEATER)).status_code == 403
        login = await client.get("/login")
        answer = await sign_in(client, ALICE[1], ALICE[2])
        cookie = answer.headers["set-cookie"]
        assert "mhp_session=" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
        assert "Path=/" in cookie and "Secure" not in cookie
        page = await client.get("/")
        for response in (login, page):
            h = response.headers
            assert h["content-security-policy"].startswith("default-src 'self'")
            assert "frame-ancestors 'none'" in h["content-security-policy"]
            assert h["x-frame-options"] == "DENY" and h["cache-control"] == "no-store"
            assert h["x-content-type-options"] == "nosniff" and h["referrer-policy"] == "no-referrer"
        assert "<script" not in page.text and not re.search(r'(src|href|action)="(https?:)?//', page.text)
        css = await client.get("/static/style.css")
        assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")


# -- CSRF, isolation ----------------------------------------------------------------------------------------------


async def test_posts_without_or_with_a_wrong_csrf_token_are_refused_and_nothing_is_stored(rig: AreaRig) -> None:
    with parties(Party(rig.local, "gw-1", topics.down("gateways", "gw-1"))) as (gw1,):
        async with customer(rig, ALICE) as client:
            _, token = await home(client)
            for form in (HEATER, {**HEATER, "csrf": ""}, {**HEATER, "csrf": token[:-2] + "xx"}):
                answer = await client.post("/appliances/heater", data=form)
                assert answer.status_code == 403 and "nothing was changed" in answer.text
            out = await client.post("/logout", data={"csrf": "wrong"})
            assert out.status_code == 403
            assert (await client.get("/")).status_code == 200, "a forged sign-out does not end the session"
        assert await rig.accounts.latest("c1") is None and await rig.accounts.appliances("c1") == {}
        assert await rig.outbox() == []
        await gw1.nothing("schedule", within=0.5)


async def test_a_customer_sees_and_changes_only_their_own_home(rig: AreaRig) -> None:
    async with customer(rig, ALICE) as alice:
        _, token = await home(alice)
        assert (await alice.post("/appliances/heater", data={**HEATER, "csrf": token})).status_code == 303
    alice_before = await rig.accounts.latest("c1")
    assert alice_before is not None and alice_before.version == 1
    async with customer(rig, BOB) as bob:
        page, token = await home(bob)
        devices = re.findall(r'<section class="appliance" data-device="([^"]+)"', page)
        assert devices == ["washer"]
        shown = re.sub(r'name="csrf" value="[^"]*"', "", page)  # a random token could contain anything
        for foreign in ("c1", "gw-1", "heater", ">ev<", '"ev"', "May run"):
            assert foreign not in shown
        # Alice's appliance through Bob's session: not his home's.
        answer = await bob.post("/appliances/heater", data={**HEATER, "csrf": token})
        assert answer.status_code == 404
        # A client id smuggled into the form is ignored: the home comes from the session.
        answer = await bob.post("/appliances/washer", data={**HEATER, "csrf": token, "client_id": "c1"})
        assert answer.status_code == 303
        assert (await bob.get("/?saved=heater")).text.count("Saved the new schedule") == 0
    after = await rig.accounts.latest("c1")
    assert after == alice_before, "Alice's schedule is untouched"
    bobs = await rig.accounts.latest("c2")
    assert bobs is not None and [a.device for a in bobs.schedule.appliances] == ["washer"]
    assert bobs.gateway_id == "gw-2"


# -- a change, to the gateway and back ---------------------------------------------------------------------------


async def test_a_valid_change_is_stored_reaches_the_gateway_and_shows_applied_after_its_ack(rig: AreaRig) -> None:
    with parties(Party(rig.local, "gw-1", topics.down("gateways", "gw-1"))) as (gw1,):
        async with customer(rig, ALICE) as client:
            page, token = await home(client)
            assert status_of(page) == "none"
            assert re.findall(r'data-device="([^"]+)"', page) == ["heater", "ev"], "switchable devices only"
            answer = await client.post("/appliances/heater", data={**HEATER, "csrf": token})
            assert answer.status_code == 303 and answer.headers["location"] == "/?saved=heater"
            schedule = await gw1.next("schedule")
            assert isinstance(schedule, Schedule) and schedule.client_id == "c1" and schedule.version == 1
            assert schedule.appliances == [ApplianceSchedule(device="heater", allowed=[("22:00", "07:00")],
                                                             run_s=7200, max_interruption_s=1800, priority=2)]
            page = (await client.get("/?saved=heater")).text
            assert "Saved the new schedule of heater." in page and status_of(page) == "sent"
            assert "May run 22:00\u201307:00; needs 2 h a day; off at most 30 min at a time; priority 2." in page
            await gw1.publish(topics.up("gateways", "gw-1"), Ack(ack_ids=[schedule.msg_id]))
            for _ in range(100):
                page = (await client.get("/")).text
                if status_of(page) == "applied":
                    break
                await asyncio.sleep(0.05)
            assert status_of(page) == "applied" and 'data-status="applied">applied by your gateway' in page
            assert await rig.outbox() == []

            # A second appliance: the next version carries the whole schedule.
            answer = await client.post("/appliances/ev", data={"csrf": token, "windows": "", "never_shed": "on"})
            assert answer.status_code == 303
            second = await gw1.next("schedule")
            assert isinstance(second, Schedule) and second.version == 2
            assert [(a.device, a.never_shed) for a in second.appliances] == [("ev", True), ("heater", False)]
            assert status_of((await client.get("/")).text) == "sent"
    stored = await rig.accounts.appliances("c1")
    assert {d: s.version for d, s in stored.items()} == {"ev": 2, "heater": 1}


async def test_invalid_input_shows_what_is_wrong_and_stores_nothing(rig: AreaRig) -> None:
    with parties(Party(rig.local, "gw-1", topics.down("gateways", "gw-1"))) as (gw1,):
        async with customer(rig, ALICE) as client:
            _, token = await home(client)
            bad = {"csrf": token, "windows": "25:00-07:00", "hours": "-3", "priority": "<b>x</b>"}
            answer = await client.post("/appliances/heater", data=bad)
            assert answer.status_code == 400
            assert "Run windows: “25:00” is not a time of day" in answer.text
            assert "Hours of running per day must be more than 0 and at most 24." in answer.text
            assert "Priority: “&lt;b&gt;x&lt;/b&gt;” is not a number." in answer.text
            assert 'value="25:00-07:00"' in answer.text, "what was typed stays in the form"
            assert "<b>x</b>" not in answer.text
            tight = await client.post("/appliances/heater", data={"csrf": token, "windows": "22:00-23:00",
                                                                   "hours": "3"})
            assert tight.status_code == 400 and "do not fit in the run windows (1 h a day)" in tight.text
        assert await rig.accounts.latest("c1") is None and await rig.outbox() == []
        await gw1.nothing("schedule", within=0.3)


async def test_sign_out_ends_the_session(rig: AreaRig) -> None:
    async with customer(rig, ALICE) as client:
        _, token = await home(client)
        session = client.cookies["mhp_session"]
        out = await client.post("/logout", data={"csrf": token})
        assert out.status_code == 303 and out.headers["location"] == "/login"
        assert "mhp_session" not in client.cookies
    async with httpx.AsyncClient(base_url=rig.url, cookies={"mhp_session": session}) as replay:
        assert (await replay.get("/")).headers["location"] == "/login", "the old cookie is worth nothing"
        answer = await replay.post("/appliances/heater", data={**HEATER, "csrf": token})
        assert answer.status_code == 403
    assert await rig.accounts.latest("c1") is None


async def test_stored_passwords_and_sessions_cannot_be_used_to_sign_in(rig: AreaRig) -> None:
    async with customer(rig, ALICE) as client:
        session = client.cookies["mhp_session"]
    db = sqlite3.connect(rig.bridge.settings.db_path)
    try:
        hashes = dict(db.execute("SELECT client_id, password_hash FROM customer_accounts"))
        tokens = [r[0] for r in db.execute("SELECT token_hash FROM customer_sessions")]
    finally:
        db.close()
    for cid, _email, password in (ALICE, BOB):
        assert hashes[cid].startswith("scrypt$") and password not in hashes[cid]
        assert verify_password(password, hashes[cid]) and not verify_password(password + "!", hashes[cid])
    assert session not in tokens and hashlib.sha256(session.encode()).hexdigest() in tokens


async def test_a_schedule_stored_but_not_queued_before_a_crash_is_sent_at_the_next_start(
        tmp_path: Path, mosquitto_factory: MosquittoFactory) -> None:
    async def crashed_after_storing(accounts: Accounts) -> None:
        await accounts.save("c2", "gw-2", ApplianceSchedule(device="washer", run_s=3600))

    async with running_area(tmp_path, mosquitto_factory, crashed_after_storing) as rig:
        with parties(Party(rig.local, "gw-2", topics.down("gateways", "gw-2"))) as (gw2,):
            got = await gw2.next("schedule")
        assert isinstance(got, Schedule) and got.client_id == "c2" and got.version == 1
        latest = await rig.accounts.latest("c2")
        assert latest is not None and latest.queued


async def test_secure_cookies_when_configured(tmp_path: Path) -> None:
    settings = BridgeSettings(retailer_id="r1", db_path=tmp_path / "b.db", customers={"c1": "gw-1"},
                              personal_area_port=0, personal_area_secure_cookies=True,
                              personal_area_scrypt_n=CHEAP_SCRYPT_N)
    store = BridgeStore(settings.db_path)
    await store.open()
    accounts = Accounts(settings.db_path, cost=ScryptCost(n=CHEAP_SCRYPT_N))
    await accounts.open()
    await accounts.add(*ALICE)
    await accounts.close()
    try:
        area = PersonalArea(settings, BridgeRelay("r1", settings.customers, store), store)
        async with area.serving(), httpx.AsyncClient(base_url=area.url) as client:
            form = await client.get("/login")
            assert "__Host-mhp_login=" in form.headers["set-cookie"] and "Secure" in form.headers["set-cookie"]
            token = csrf_of(form.text)
            client.cookies.set("__Host-mhp_login", token)  # httpx keeps a Secure cookie off plain HTTP
            answer = await client.post("/login", data={"csrf": token, "email": ALICE[1], "password": ALICE[2]})
            assert answer.status_code == 303
            cookie = answer.headers["set-cookie"]
            assert cookie.startswith("__Host-mhp_session=") and "Secure" in cookie and "HttpOnly" in cookie
    finally:
        await store.close()


# -- the command line ---------------------------------------------------------------------------------------------


def test_customer_add_and_set_password_from_the_command_line(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "bridge.toml"
    config.write_text(f'[bridge]\nretailer_id = "r1"\ndb_path = "{tmp_path / "b.db"}"\n'
                      f'personal_area_scrypt_n = {CHEAP_SCRYPT_N}\n'
                      '[bridge.customers]\nc1 = "gw-1"\nc2 = "gw-2"\n')
    secret = tmp_path / "pw"
    secret.write_text("first password 123\n")
    base = ["customer", "add", "--config", str(config), "--password-file", str(secret)]
    assert bridge_cli([*base, "--client-id", "c1", "--email", "alice@example.com"]) == 0
    assert "account of c1 (alice@example.com) created" in capsys.readouterr().out
    assert bridge_cli([*base, "--client-id", "c2", "--email", "ALICE@example.com"]) == 1
    assert "already has an account" in capsys.readouterr().err
    assert bridge_cli([*base, "--client-id", "c9", "--email", "x@example.com"]) == 2
    assert bridge_cli([*base, "--client-id", "c2", "--email", "not-an-address"]) == 1
    secret.write_text("short\n")
    assert bridge_cli([*base, "--client-id", "c2", "--email", "bob@example.com"]) == 1
    assert "at least 10 characters" in capsys.readouterr().err
    secret.write_text("second password 456\n")
    change = ["customer", "set-password", "--config", str(config), "--client-id", "c1", "--password-file", str(secret)]
    assert bridge_cli(change) == 0

    async def logins() -> list[str | None]:
        accounts = Accounts(tmp_path / "b.db", cost=ScryptCost(n=CHEAP_SCRYPT_N))
        await accounts.open()
        try:
            return [(await accounts.login("alice@example.com", pw, "127.0.0.1")).client_id
                    for pw in ("first password 123", "second password 456")]
        finally:
            await accounts.close()

    assert asyncio.run(logins()) == [None, "c1"]


# -- the pure parts -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "windows"), [
    ("", []),
    ("22:00-07:00", [("22:00", "07:00")]),
    ("7:30 \u2013 9:00; 12:00 to 14:00\n18:00-24:00", [("07:30", "09:00"), ("12:00", "14:00"), ("18:00", "24:00")]),
    ("00:00-24:00", [("00:00", "24:00")]),
])
def test_run_windows_that_are_accepted(text: str, windows: list[tuple[str, str]]) -> None:
    assert parse_windows(text) == windows


@pytest.mark.parametrize(("text", "error"), [
    ("25:00-07:00", "“25:00” is not a time of day"),
    ("22:60-23:00", "“22:60” is not a time of day"),
    ("24:00-01:00", "“24:00” is not a time of day"),
    ("22:00", "is not a window like"),
    ("10:00-10:00", "starts when it ends"),
    ("<b>-</b>", "is not a time of day"),
    (",".join(["01:00-02:00"] * 25), "at most 24 run windows"),
])
def test_run_windows_that_are_refused(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        parse_windows(text)


@pytest.mark.parametrize(("form", "errors"), [
    ({"hours": "-1"}, ["Hours of running per day must be more than 0 and at most 24."]),
    ({"hours": "0"}, ["Hours of running per day must be more than 0 and at most 24."]),
    ({"hours": "nan"}, ["Hours of running per day: “nan” is not a number."]),
    ({"max_interruption_min": "-5"}, ["Longest interruption (minutes) must be at least 0 and at most 1440."]),
    ({"priority": "2.5"}, ["Priority: “2.5” is not a whole number."]),
    ({"priority": "1001"}, ["Priority must be at least 0 and at most 1000."]),
    ({"windows": "01:00-02:00", "hours": "1.5"},
     ["Hours of running per day: 1.5 h do not fit in the run windows (1 h a day)."]),
])
def test_appliance_forms_that_are_refused(form: dict[str, str], errors: list[str]) -> None:
    assert parse_appliance_form("heater", form) == (None, errors)


def test_an_appliance_form_that_is_accepted() -> None:
    form = {"windows": "23:00-06:00", "hours": "1,5", "max_interruption_min": "45", "priority": "0",
            "never_shed": "on"}
    assert parse_appliance_form("boiler", form) == (ApplianceSchedule(
        device="boiler", allowed=[("23:00", "06:00")], run_s=5400, max_interruption_s=2700, priority=0,
        never_shed=True), [])
    assert parse_appliance_form("boiler", {}) == (ApplianceSchedule(device="boiler"), [])


POLICY = ThrottlePolicy(max_failures=3, window_s=60, lockout_s=30)


@pytest.mark.parametrize(("before", "now", "after", "locked"), [
    (None, 100, FailureRecord(1, 100), 0),
    (FailureRecord(1, 100), 110, FailureRecord(2, 100), 0),
    (FailureRecord(2, 100), 120, FailureRecord(3, 100, 150), 30),
    (FailureRecord(2, 100), 161, FailureRecord(1, 161), 0),  # outside the window: counting starts again
    (FailureRecord(3, 100, 150), 151, FailureRecord(1, 151), 0),  # the lock-out is over
])
def test_login_throttle(before: FailureRecord | None, now: float, after: FailureRecord, locked: float) -> None:
    assert after_failure(before, now, POLICY) == after
    assert locked_for(after, now) == locked


def test_password_hashes_are_salted_and_checked() -> None:
    cheap = ScryptCost(n=2**10)
    a, b = hash_password("same password", cheap), hash_password("same password", cheap)
    assert a != b and "same password" not in a
    assert verify_password("same password", a) and not verify_password("Same password", a)
    assert not verify_password("same password", "plain$text") and not verify_password("x", "")


def test_switchable_devices_and_schedule_status() -> None:
    assert switchable({"meter": {"kw": 1.0}, "a": {"on": True}, "b": {"on": False}, "c": {"on": None}}) == {
        "a": "on", "b": "off", "c": "unavailable"}
    assert schedule_status(None, False) == "none"
