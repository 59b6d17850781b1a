"""Hostile input to the customers' personal area, over real HTTP against a real bridge between two real Mosquittos
(``tests/retailer_bridge/personal_area_rig.py``): the quadratic run-windows payload, over-long form fields, form
floods, sign-in guesses through a reverse proxy, the scrypt cost of new passwords, and e-mail addresses in logs."""

from __future__ import annotations

import logging
import re
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from retailer_bridge.accounts import Accounts, ScryptCost, hash_password
from retailer_bridge.personal_area import PersonalArea, parse_appliance_form, parse_windows
from retailer_bridge.relay import BridgeRelay
from retailer_bridge.settings import BridgeSettings
from retailer_bridge.store import BridgeStore
from tests.broker_fixtures import MosquittoFactory
from tests.retailer_bridge.personal_area_rig import ALICE, BOB, AreaRig, csrf_of, customer, home, running_area

BOUND = 512
"""The longest run-windows text the personal area parses (``MAX_WINDOWS_CHARS``)."""
HEATER = {"windows": "22:00-07:00", "hours": "2", "max_interruption_min": "30", "priority": "2"}


@pytest.fixture
async def rig(tmp_path: Path, mosquitto_factory: MosquittoFactory) -> AsyncIterator[AreaRig]:
    async with running_area(tmp_path, mosquitto_factory) as r:
        yield r


def failure_keys(rig: AreaRig) -> set[str]:
    """The keys the bridge counts failed sign-ins under (``address:...``, ``account:...``)."""
    db = sqlite3.connect(rig.bridge.settings.db_path)
    try:
        return {r[0] for r in db.execute("SELECT key FROM customer_login_failures")}
    finally:
        db.close()


async def post_login(client: httpx.AsyncClient, email: str, password: str,
                     forwarded_for: str | None = None) -> httpx.Response:
    """Open the sign-in form and submit it, both with ``X-Forwarded-For`` when given (the answer, not followed)."""
    headers = {} if forwarded_for is None else {"x-forwarded-for": forwarded_for}
    form = await client.get("/login", headers=headers)
    assert form.status_code == 200
    return await client.post("/login", headers=headers,
                             data={"csrf": csrf_of(form.text), "email": email, "password": password})


# -- the run windows: bounded, parsed in one pass -----------------------------------------------------------------


@pytest.mark.parametrize("size", [16_000, 160_000])
def test_the_quadratic_window_payload_is_refused_by_its_length_before_it_is_parsed(size: int) -> None:
    # The old pattern backtracked quadratically on this (4 s of CPU at 16,000 dashes on the bridge's event loop).
    # Refused by length, the parser never looks at it: the answer is the length, not what is wrong inside.
    text = "-" * size + " b"
    with pytest.raises(ValueError, match=f"^at most {BOUND} characters$"):
        parse_windows(text)
    assert parse_appliance_form("heater", {"windows": text, "hours": "2"}) == (
        None, [f"Run windows: at most {BOUND} characters."])


@pytest.mark.parametrize(("text", "error"), [
    ("-" * (BOUND - 2) + " b", "is not a window like"),  # the attack, as long as is allowed
    ("-" * BOUND, "is not a window like"),
    ("\u2013" * (BOUND - 1) + "x", "is not a window like"),
    ("to " * (BOUND // 3), "is not a window like"),
    ("1" * BOUND, "is not a window like"),
    (" " * (BOUND - 1) + "-", "is not a window like"),
    ("0:00-" * (BOUND // 5), "is not a window like"),
    ("1:00 -" + " " * (BOUND - 12) + "x", "“x” is not a time of day"),
    ("-\n" * (BOUND // 2), "at most 24 run windows"),
])
def test_pathological_windows_up_to_the_bound_get_a_clear_error(text: str, error: str) -> None:
    assert len(text) <= BOUND
    with pytest.raises(ValueError, match=error):
        parse_windows(text)


async def test_the_payload_over_http_gets_a_clear_4xx_and_the_area_keeps_serving(rig: AreaRig) -> None:
    async with customer(rig, ALICE) as client:
        _, token = await home(client)
        attack = await client.post("/appliances/heater", data={**HEATER, "csrf": token,
                                                               "windows": "-" * 16_000 + " b"})
        assert attack.status_code == 400
        assert f"The field “windows” is too long (at most {BOUND} characters)." in attack.text
        at_bound = await client.post("/appliances/heater", data={**HEATER, "csrf": token,
                                                                 "windows": "-" * (BOUND - 2) + " b"})
        assert at_bound.status_code == 400 and "is not a window like 22:00-07:00" in at_bound.text
        # 160,000 characters are past the area's body limit: answered 413 as they arrive, before the form is parsed,
        # and the connection closed (test_http_bodies.py reads that answer over a raw socket).
        # Every other field has its bound too, a field the form does not have included.
        for name, longest in (("hours", 32), ("max_interruption_min", 32), ("priority", 32), ("never_shed", 8),
                              ("csrf", 128), ("client_id", 256)):
            answer = await client.post("/appliances/heater", data={**HEATER, "csrf": token, name: "1" * (longest + 1)})
            assert answer.status_code == 400, name
            assert f"The field “{name}” is too long (at most {longest} characters)." in answer.text
        # Nothing of it was stored or sent; the same customer's next valid change goes through.
        assert await rig.accounts.latest("c1") is None and await rig.outbox() == []
        ok = await client.post("/appliances/heater", data={**HEATER, "csrf": token})
        assert ok.status_code == 303
    latest = await rig.accounts.latest("c1")
    assert latest is not None and latest.version == 1
    async with customer(rig) as client:
        for name, longest in (("email", 254), ("password", 1024)):
            form = await client.get("/login")
            answer = await client.post("/login", data={"csrf": csrf_of(form.text), "email": ALICE[1],
                                                       "password": ALICE[2], name: "a" * (longest + 1)})
            assert answer.status_code == 400, name
            assert f"The field “{name}” is too long (at most {longest} characters)." in answer.text
        assert failure_keys(rig) == set(), "a refused form is not a failed sign-in"
    async with customer(rig, BOB) as bob:
        assert (await bob.get("/")).status_code == 200


# -- form floods: per account, per address --------------------------------------------------------------------


async def test_a_flood_of_changes_gets_429_after_the_limit_while_another_customer_still_saves(
        tmp_path: Path, mosquitto_factory: MosquittoFactory, caplog: pytest.LogCaptureFixture) -> None:
    # One form every 1,000 s sustained, 4 at once per account: the flood cannot refill its bucket during the test.
    async with running_area(tmp_path, mosquitto_factory, personal_area_form_rate_per_s=0.001,
                            personal_area_form_burst=4) as rig:
        caplog.set_level(logging.WARNING, logger="retailer_bridge.personal_area")
        async with customer(rig, ALICE) as alice, customer(rig, BOB) as bob:
            _, token = await home(alice)
            answers = [await alice.post("/appliances/heater", data={**HEATER, "csrf": token, "hours": str(h)})
                       for h in range(1, 9)]
            assert [a.status_code for a in answers] == [303] * 4 + [429] * 4
            refused = answers[-1]
            assert "Too many forms sent in a short time; nothing was changed." in refused.text
            assert int(refused.headers["retry-after"]) >= 900
            # Bob, from the same address, is not slowed by Alice's flood.
            _, bob_token = await home(bob)
            saved = await bob.post("/appliances/washer", data={"csrf": bob_token, "hours": "1"})
            assert saved.status_code == 303
        latest = await rig.accounts.latest("c1")
        assert latest is not None and latest.version == 4, "the refused posts changed nothing"
        assert latest.schedule.appliances[0].run_s == 4 * 3600
        bobs = await rig.accounts.latest("c2")
        assert bobs is not None and bobs.version == 1
        expected = "POST '/appliances/heater' as c1 from 127.0.0.1 refused: too many form posts for that account"
        assert any(r.getMessage() == expected for r in caplog.records)

        # Sign-ins count per e-mail address (in any case): Bob's own sign-in above was the first of four, so the
        # fourth guess is refused before its password is checked, and the log names the account by its pseudonym.
        async with customer(rig) as client:
            tries = [await post_login(client, BOB[1].upper() if i % 2 else BOB[1], f"guess {i}") for i in range(4)]
            assert [t.status_code for t in tries] == [401] * 3 + [429]
            assert "Too many forms sent in a short time" in tries[-1].text
        refused = [r.getMessage() for r in caplog.records if "POST '/login' as" in r.getMessage()]
        assert refused == [f"POST '/login' as {rig.accounts.pseudonym(BOB[1])} from 127.0.0.1 refused: too many "
                           "form posts for that account"]


async def test_a_flood_of_sign_ins_from_one_address_gets_429_while_another_address_signs_in(
        tmp_path: Path, mosquitto_factory: MosquittoFactory) -> None:
    async with running_area(tmp_path, mosquitto_factory, personal_area_trusted_proxies=["127.0.0.1"],
                            personal_area_address_rate_per_s=0.001, personal_area_address_burst=6) as rig:
        async with customer(rig) as attacker:
            emails = [f"guess{i}@example.net" for i in range(9)]
            answers = [await post_login(attacker, e, "wrong password", forwarded_for="203.0.113.7") for e in emails]
            assert [a.status_code for a in answers] == [401] * 6 + [429] * 3
            assert "Too many forms sent in a short time" in answers[-1].text
            assert int(answers[-1].headers["retry-after"]) >= 900
        async with customer(rig) as client:
            answer = await post_login(client, BOB[1], BOB[2], forwarded_for="198.51.100.2")
            assert answer.status_code == 303 and answer.headers["location"] == "/"


# -- login throttling: by account and by the real client address ---------------------------------------------------


async def test_sign_in_throttling_behind_a_trusted_proxy_is_per_forwarded_address_and_per_account(
        tmp_path: Path, mosquitto_factory: MosquittoFactory) -> None:
    async with running_area(tmp_path, mosquitto_factory, personal_area_trusted_proxies=["127.0.0.0/8"]) as rig:
        async with customer(rig) as client:
            # A distributed guess at Alice's password, one try from each of five addresses, locks her account...
            answers = [await post_login(client, ALICE[1].upper(), f"guess {i}", forwarded_for=f"203.0.113.{i}")
                       for i in range(1, 6)]
            assert [a.status_code for a in answers] == [401, 401, 401, 401, 429]
            locked = await post_login(client, ALICE[1], ALICE[2], forwarded_for="198.51.100.9")
            assert locked.status_code == 429 and "Too many failed sign-ins" in locked.text
            # ...each failure counted under the customer's address the proxy forwarded, not the proxy's own.
            keys = failure_keys(rig)
            assert {f"address:203.0.113.{i}" for i in range(1, 6)} <= keys
            assert "address:127.0.0.1" not in keys and "account:alice@example.com" in keys
            # A forged hop before the proxy's own entry is not believed: the proxy appended the real peer.
            await post_login(client, "nobody@example.net", "wrong password",
                             forwarded_for="192.0.2.66, 203.0.113.1")
            assert "address:192.0.2.66" not in failure_keys(rig)
            # Bob, from one of the guessing addresses, still signs in: that address failed once only.
            answer = await post_login(client, BOB[1], BOB[2], forwarded_for="203.0.113.1")
            assert answer.status_code == 303


async def test_without_trusted_proxies_a_forged_forwarded_for_is_ignored(rig: AreaRig) -> None:
    async with customer(rig) as client:
        for i in range(3):
            answer = await post_login(client, "nobody@example.net", "wrong password", forwarded_for=f"203.0.113.{i}")
            assert answer.status_code == 401
    keys = failure_keys(rig)
    assert "address:127.0.0.1" in keys and not any(k.startswith("address:203.") for k in keys)


def test_trusted_proxies_must_be_addresses_or_networks() -> None:
    ok = BridgeSettings(retailer_id="r1", personal_area_trusted_proxies=["10.0.0.0/8", "::1", "192.0.2.4"])
    assert ok.personal_area_trusted_proxies == ["10.0.0.0/8", "::1", "192.0.2.4"]
    with pytest.raises(ValidationError, match=re.escape("not an IP address or network: proxy.example, 10.0.0.0/33")):
        BridgeSettings(retailer_id="r1", personal_area_trusted_proxies=["proxy.example", "10.0.0.0/33"])
    assert BridgeSettings(retailer_id="r1").personal_area_trusted_proxies == []


# -- scrypt's cost ---------------------------------------------------------------------------------------------------


async def test_new_passwords_use_scrypt_n_2_17_and_old_hashes_still_verify(tmp_path: Path) -> None:
    assert ScryptCost() == ScryptCost(n=2**17, r=8, p=1)
    assert hash_password("a new password").split("$")[:4] == ["scrypt", "131072", "8", "1"]
    settings = BridgeSettings(retailer_id="r1", db_path=tmp_path / "b.db", customers={"c1": "gw-1", "c2": "gw-2"})
    assert settings.personal_area_scrypt_n == 2**17
    store = BridgeStore(settings.db_path)
    area = PersonalArea(settings, BridgeRelay("r1", settings.customers, store), store)
    assert area.accounts.cost == ScryptCost(n=2**17)
    with pytest.raises(ValidationError, match="below 2\\*\\*17 is for development only"):
        BridgeSettings(retailer_id="r1", environment="production", hub_mqtt_password="x", local_mqtt_password="y",
                       personal_area_scrypt_n=2**15)
    with pytest.raises(ValidationError, match="power of two"):
        BridgeSettings(retailer_id="r1", personal_area_scrypt_n=100_000)

    # An account made before (N=2**15) still signs in with today's accounts (N=2**17), and its hash is replaced
    # by a 2**17 one then; a new account gets 2**17 at once.
    before = Accounts(settings.db_path, cost=ScryptCost(n=2**15))
    await before.open()
    try:
        await before.add(*BOB)
    finally:
        await before.close()
    accounts = Accounts(settings.db_path)
    await accounts.open()
    try:
        await accounts.add(*ALICE)
        alice, bob = await accounts.account("c1"), await accounts.account("c2")
        assert alice is not None and alice["password_hash"].startswith("scrypt$131072$8$1$")
        assert bob is not None and bob["password_hash"].startswith("scrypt$32768$8$1$")
        assert (await accounts.login(BOB[1], BOB[2], "127.0.0.1")).client_id == "c2"
        upgraded = await accounts.account("c2")
        assert upgraded is not None and upgraded["password_hash"].startswith("scrypt$131072$8$1$")
        assert (await accounts.login(BOB[1], BOB[2], "127.0.0.1")).client_id == "c2"
        assert (await accounts.login(ALICE[1], ALICE[2], "127.0.0.1")).client_id == "c1"
    finally:
        await accounts.close()


# -- no e-mail address in the log ------------------------------------------------------------------------------------


async def test_the_log_names_sign_ins_by_a_pseudonym_never_by_the_e_mail_address(
        rig: AreaRig, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with customer(rig) as client:
        for i in range(6):  # the fifth failure locks the account, the sixth try is refused while locked
            await post_login(client, "Alice@Example.com" if i % 2 else ALICE[1], f"guess {i}")
        for i in range(2):
            await post_login(client, "mallory@example.net", f"guess {i}")
    async with customer(rig, BOB) as bob:
        _, token = await home(bob)
        assert (await bob.post("/appliances/washer", data={"csrf": token, "hours": "1"})).status_code == 303
        assert (await bob.post("/logout", data={"csrf": token})).status_code == 303
    # Only the bridge's own loggers: the test's HTTP client logs what it sends, and the loop's stall watchdog logs
    # source lines of the loop thread's stack (code, not data: this test's own lines name Alice's address).
    messages = [r.getMessage() for r in caplog.records
                if not r.name.startswith(("httpx", "httpcore", "mhp_wire.loopwatch"))]
    leaked = [m for m in messages if "@" in m or "example.com" in m or "example.net" in m]
    assert leaked == []
    alice = rig.accounts.pseudonym(ALICE[1])
    assert re.fullmatch(r"acct-[0-9a-f]{12}", alice)
    locked = [m for m in messages if "refused: locked for" in m]
    assert len(locked) == 2 and all(alice in m for m in locked), "the lock-out is logged under Alice's pseudonym"
    # The same name for the same address in any case, after a restart too; another address gets another name.
    accounts = Accounts(tmp_path / "bridge.db", cost=ScryptCost(n=2**10))
    await accounts.open()
    try:
        assert accounts.pseudonym("ALICE@example.com ") == alice
        assert accounts.pseudonym(BOB[1]) != alice
    finally:
        await accounts.close()
