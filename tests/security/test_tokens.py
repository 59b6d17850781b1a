"""Bearer token expiry, revocation and rotation without restart, over real HTTP against a running hub."""

from __future__ import annotations

import asyncio
import json

import pytest

from cloud_hub.cli import main
from cloud_hub.tokens import TokenBook
from tests.hub_fixtures import HubHandle


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(["token", *args]) == 0
    return capsys.readouterr().out.strip()


async def get_client(hub: HubHandle, token: str) -> tuple[int, str]:
    r = await hub.http.get("/v1/clients/c1", headers={"Authorization": f"Bearer {token}"})
    assert r.headers["content-type"].startswith("application/json")
    return r.status_code, r.json().get("message", "")


async def test_an_expired_token_gets_401_token_expired(hub: HubHandle, capsys: pytest.CaptureFixture[str]) -> None:
    await hub.setup_registry({"c1": "r1"})
    path = str(hub.app.state.tokens.path)
    short = cli(capsys, "issue", "--tokens-file", path, "--principal", "dso", "--expires-in", "1")
    past = cli(capsys, "issue", "--tokens-file", path, "--principal", "dso", "--expires-in", "-1")
    entry = json.loads(hub.app.state.tokens.path.read_text())["tokens"][-1]
    assert entry["expires_at"].endswith("+00:00"), "stored as RFC 3339 with its offset"
    assert await get_client(hub, short) == (200, "")
    assert await get_client(hub, past) == (401, "token expired")
    await asyncio.sleep(1.1)
    assert await get_client(hub, short) == (401, "token expired")
    assert await get_client(hub, "never-issued") == (401, "invalid or revoked bearer token")
    assert (await get_client(hub, hub.tokens["dso"]))[0] == 200, "tokens without expires_at never expire"


async def test_rotation_without_restart(hub: HubHandle, capsys: pytest.CaptureFixture[str]) -> None:
    await hub.setup_registry({"c1": "r1"})
    path = str(hub.app.state.tokens.path)
    old = hub.tokens["r1"]
    assert (await get_client(hub, old))[0] == 200
    new = cli(capsys, "issue", "--tokens-file", path, "--principal", "retailer:r1")
    assert (await get_client(hub, new))[0] == 200, "both work during the rotation"
    assert cli(capsys, "revoke", "--tokens-file", path, "--principal", "retailer:r1", "--keep-newest") == (
        "revoked 1 token(s) of retailer:r1")
    assert await get_client(hub, old) == (401, "invalid or revoked bearer token"), "the old one is refused at once"
    assert (await get_client(hub, new))[0] == 200
    # Still authenticated (not 401); r2 does not supply c1, which to a retailer is an unknown client (404).
    assert (await get_client(hub, hub.tokens["r2"]))[0] == 404, "other principals are untouched"
    cli(capsys, "revoke", "--tokens-file", path, "--principal", "retailer:r1")
    assert await get_client(hub, new) == (401, "invalid or revoked bearer token")
    assert (await get_client(hub, hub.tokens["dso"]))[0] == 200


def test_rewrites_within_one_clock_tick_are_still_seen(tmp_path: object) -> None:
    from pathlib import Path

    book = TokenBook(Path(str(tmp_path)) / "t.json")
    a = book.issue("dso")
    assert book.principal(a) is not None
    for _ in range(20):  # issue-and-revoke faster than a coarse mtime can tell apart
        book.revoke("dso")
        assert book.principal(a) is None
        a = book.issue("dso")
        assert book.principal(a) is not None


def test_cli_refuses_an_unknown_principal(tmp_path: object, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["token", "revoke", "--tokens-file", f"{tmp_path}/t.json", "--principal", "nobody"]) == 2
    assert "unknown principal" in capsys.readouterr().err


async def test_an_unreadable_tokens_file_fails_closed(hub: HubHandle) -> None:
    book_path = hub.app.state.tokens.path
    good = book_path.read_text()
    book_path.write_text("{ this is not json")
    r = await hub.http.get("/v1/clients/c1", headers=hub.auth("dso"))
    assert r.status_code == 401, "no token is accepted while the file cannot be read"
    assert (await hub.http.get("/healthz")).status_code == 200
    book_path.write_text(good)
    r = await hub.http.get("/v1/clients/nobody", headers=hub.auth("dso"))
    assert r.status_code == 404, "accepted again once the file is fixed"
