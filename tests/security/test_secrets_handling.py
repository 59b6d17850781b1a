"""Hostile tests of secret handling: files holding secrets are never readable by others, not even for a moment, and
settings errors never print a secret.

Secret files: every writer runs under a umask of 0 (the most permissive an operator's shell can have). A watcher on
``os.open``/``os.chmod``/``os.fchmod`` checks the real file at each step: a file created readable by others, or a
file holding bytes that is still readable by others when the writer gets round to ``chmod``, is a moment in which
another local user could read the secret. Settings errors: each service's settings are given a secret next to a
bad value; the error text and each command's standard error must not contain the secret (pydantic shows the input
of the failing model, the whole dict of settings, in ``input_value=...``).
"""

from __future__ import annotations

import argparse
import os
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from broker_config.render import BrokerSpec, Identity, render
from broker_config.tls import create_pki
from cloud_hub.settings import HubSettings
from cloud_hub.tokens import TokenBook
from hems_firmware.config import GatewayConfig
from hems_firmware.installer import provision
from mhp_wire.secretfile import write_private
from retailer_bridge.settings import BridgeSettings
from sim.stack.stack import Stack

SECRET = "Zq8Hx2Kp9Wm4Tr7Vb3Ny6Lc5Qd"
"""A secret long enough that pydantic would show a prefix of it (it clips long inputs with ``...``)."""


def leaks(text: str) -> bool:
    """Whether ``text`` shows the secret or any 5-character piece of it (pydantic clips to a 6-character prefix)."""
    return any(SECRET[i:i + 5] in text for i in range(len(SECRET) - 4))


# -- secret files -----------------------------------------------------------------------------------------------


@dataclass
class FileWatch:
    """What the watcher saw: files created readable by others, and secret bytes readable by others before chmod."""

    root: Path
    created: dict[str, int] = field(default_factory=dict)
    exposed: list[str] = field(default_factory=list)

    def check_before_chmod(self, target: int | str | Path, how: str) -> None:
        st = os.fstat(target) if isinstance(target, int) else os.stat(target)
        if stat.S_ISREG(st.st_mode) and st.st_size > 0 and st.st_mode & 0o077:
            self.exposed.append(f"{target}: {st.st_size} bytes readable as {stat.filemode(st.st_mode)} before {how}")


@pytest.fixture
def watch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FileWatch]:
    """Umask 0 and a watcher of every file opened, created or chmod-ed under ``tmp_path``."""
    w = FileWatch(tmp_path)
    real_open, real_chmod, real_fchmod = os.open, os.chmod, os.fchmod

    def watched_open(path: Any, flags: int, mode: int = 0o777, *args: Any, **kwargs: Any) -> int:
        fd = real_open(path, flags, mode, *args, **kwargs)
        if flags & os.O_CREAT and str(path).startswith(str(tmp_path)):
            w.created[str(path)] = stat.S_IMODE(os.fstat(fd).st_mode)
        return fd

    def watched_chmod(path: Any, mode: int, *args: Any, **kwargs: Any) -> None:
        if str(path).startswith(str(tmp_path)):
            w.check_before_chmod(path, f"chmod {mode:o}")
        real_chmod(path, mode, *args, **kwargs)

    def watched_fchmod(fd: int, mode: int) -> None:
        w.check_before_chmod(fd, f"fchmod {mode:o}")
        real_fchmod(fd, mode)

    monkeypatch.setattr(os, "open", watched_open)
    monkeypatch.setattr(os, "chmod", watched_chmod)
    monkeypatch.setattr(os, "fchmod", watched_fchmod)
    old = os.umask(0)
    try:
        yield w
    finally:
        os.umask(old)


def assert_private(w: FileWatch, path: Path, mode: int = 0o600) -> None:
    """``path`` holds bytes, has exactly ``mode``, and no moment existed in which another user could read it."""
    assert path.stat().st_size > 0
    assert stat.S_IMODE(path.stat().st_mode) == mode, f"{path} is {stat.filemode(path.stat().st_mode)}"
    assert not w.exposed, w.exposed
    mine = {p: m for p, m in w.created.items() if Path(p) == path or Path(p).name.startswith(f".{path.name}.")}
    assert mine, f"{path} was not created through os.open with a mode"
    wide = {p: oct(m) for p, m in mine.items() if m & 0o077 & ~mode}
    assert not wide, f"created wider than {mode:o}: {wide}"


def test_write_private_creates_the_file_with_its_final_mode(watch: FileWatch, tmp_path: Path) -> None:
    target = tmp_path / "secret.txt"
    target.write_text("old, world-readable")  # an earlier file at the name is replaced, not reused
    os.chmod(target, 0o644)
    watch.created.clear()
    watch.exposed.clear()
    write_private(target, SECRET)
    assert target.read_text() == SECRET
    assert_private(watch, target)
    assert [p for p in watch.created if p != str(target)], "written under a temporary name, then renamed"
    assert all(m == 0o600 for m in watch.created.values()), watch.created
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret.txt"], "no temporary file left behind"


def test_write_private_never_follows_a_planted_symlink(watch: FileWatch, tmp_path: Path) -> None:
    """An attacker who can write to the directory cannot make the writer open their file: the temporary name is
    random and opened with O_EXCL|O_NOFOLLOW, and the rename replaces a planted link instead of writing through it."""
    theirs = tmp_path / "attacker-owned"
    theirs.write_text("")
    target = tmp_path / "tokens.json"
    target.symlink_to(theirs)
    write_private(target, SECRET)
    assert theirs.read_text() == "" and not target.is_symlink() and target.read_text() == SECRET


def test_hub_tokens_file(watch: FileWatch, tmp_path: Path) -> None:
    book = TokenBook(tmp_path / "hub-tokens.json")
    book.issue("dso")
    book.issue("retailer:r1")
    assert_private(watch, book.path)


def test_broker_password_and_acl_files(watch: FileWatch, tmp_path: Path) -> None:
    spec = BrokerSpec(kind="hub", port=1883, data_dir=tmp_path / "broker", privileged=Identity("hub", SECRET),
                      parties=[Identity("r1", SECRET)])
    render(spec)
    assert_private(watch, spec.password_path)
    assert_private(watch, spec.acl_path)


def test_tls_private_keys(watch: FileWatch, tmp_path: Path) -> None:
    pki = create_pki(tmp_path / "tls", ["127.0.0.1"], servers=["broker"], clients=["r1"])
    for pair in (pki.ca, pki.servers["broker"], pki.clients["r1"]):
        assert_private(watch, pair.keyfile)
        assert stat.S_IMODE(pair.certfile.stat().st_mode) == 0o644


def test_gateway_provisioning(watch: FileWatch, tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_bytes(SECRET.encode())  # the installer's own file; the test only needs its content
    os.chmod(pw, 0o600)
    watch.exposed.clear()
    args = argparse.Namespace(output=tmp_path / "gateway.toml", id="gw-9", client_id="c9", broker="10.0.0.2:1884",
                              password=None, password_file=pw, password_stdin=False, ca_file=None, production=False,
                              device=[], state_dir=tmp_path / "state", contracted_power_kw=None, interactive=False,
                              force=False)
    assert provision(args) == 0
    assert_private(watch, tmp_path / "gateway.toml", 0o640)


def test_stack_state_files(watch: FileWatch, tmp_path: Path) -> None:
    """``mhp-stack``'s component configurations (they hold MQTT passwords) and ``stack.json`` (every credential)."""
    stack = Stack(tmp_path / "state")
    stack.dir.mkdir(mode=0o700)
    cfg = stack._write_toml("hub.toml", {"hub": {"mqtt_password": SECRET}})
    assert_private(watch, cfg)
    stack.tokens = {"dso": SECRET}
    stack.write_info()
    assert_private(watch, stack.dir / "stack.json")


# -- settings errors --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [
    pytest.param(lambda: HubSettings(mqtt_password=SECRET, tls_certfile=Path("/etc/cert.pem")), id="hub-model"),
    pytest.param(lambda: HubSettings(mqtt_password=SECRET, http_port="eighty"), id="hub-field"),
    pytest.param(lambda: HubSettings(mqtt_password=SECRET, environment="production"), id="hub-production"),
    pytest.param(lambda: BridgeSettings(retailer_id="r1", hub_mqtt_password=SECRET, telemetry_store="influxdb"),
                 id="bridge-model"),
    pytest.param(lambda: BridgeSettings(retailer_id="r1", local_mqtt_password=SECRET, influx_token=SECRET,
                                        environment="production"), id="bridge-production"),
    pytest.param(lambda: BridgeSettings(retailer_id="r1", hub_mqtt_password=SECRET, local_mqtt_port=0),
                 id="bridge-field"),
    pytest.param(lambda: HubSettings(mqtt_password=[SECRET]), id="hub-secret-of-the-wrong-type"),
    pytest.param(lambda: GatewayConfig.model_validate(
        {"gateway": {"id": "gw-1", "client_id": "c1", "uplink": {"password": SECRET, "port": 0}}}), id="gateway"),
])
def test_a_settings_error_never_shows_a_secret(make: Callable[[], object]) -> None:
    with pytest.raises(ValidationError) as err:
        make()
    text = str(err.value)
    assert "validation error" in text, "the error still says what is wrong"
    assert not leaks(text), text


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env}, stdin=subprocess.DEVNULL)


def test_hub_cli_settings_error_does_not_print_the_password(tmp_path: Path) -> None:
    out = run_cli(["cloud_hub.cli", "serve"], {"MHP_HUB_MQTT_PASSWORD": SECRET,
                                               "MHP_HUB_TLS_CERTFILE": str(tmp_path / "cert.pem")})
    assert out.returncode == 2 and "tls_keyfile" in out.stderr, out.stderr
    assert not leaks(out.stderr + out.stdout), out.stderr


def test_bridge_cli_settings_error_does_not_print_the_passwords(tmp_path: Path) -> None:
    cfg = tmp_path / "bridge.toml"
    cfg.write_text(f'[bridge]\nretailer_id = "r1"\nhub_mqtt_password = "{SECRET}"\nlocal_mqtt_password = "{SECRET}"\n'
                   f'influx_token = "{SECRET}"\ntelemetry_store = "influxdb"\n')
    out = run_cli(["retailer_bridge.cli", "run", "--config", str(cfg)], {})
    assert out.returncode == 2 and "influx_url" in out.stderr, out.stderr
    assert not leaks(out.stderr + out.stdout), out.stderr


def test_gateway_cli_config_error_does_not_print_the_password(tmp_path: Path) -> None:
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(f'[gateway]\nid = "gw-1"\nclient_id = "c1"\n[gateway.uplink]\npassword = "{SECRET}"\nport = 0\n')
    out = run_cli(["hems_firmware.cli", "selftest", "--config", str(cfg)], {})
    assert out.returncode == 2 and "uplink.port" in out.stderr, out.stderr
    assert not leaks(out.stderr + out.stdout), out.stderr
