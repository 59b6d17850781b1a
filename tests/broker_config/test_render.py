"""The rendered configuration files, without running a broker (except to prove the password format)."""

from __future__ import annotations

import base64
import json
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from broker_config import (
    GENERATED_PASSWORD_ITERATIONS,
    BrokerConfigError,
    BrokerSpec,
    Identity,
    MosquittoProcess,
    generate_password,
    hash_password,
    render,
)
from broker_config.__main__ import main as cli_main
from broker_config.render import acl_text, conf_text, validate
from mhp_wire import topics
from tests.broker_fixtures import MosquittoFactory, free_port

from .conftest import ConnectAs


def hub_spec(tmp_path: Path, **kw: object) -> BrokerSpec:
    args: dict[str, object] = {
        "kind": "hub",
        "port": 18830,
        "data_dir": tmp_path / "hub",
        "privileged": Identity("hub", "hub-pw"),
        "parties": [Identity("r1", "r1-pw"), Identity("r2", "r2-pw")],
    }
    args.update(kw)
    return BrokerSpec(**args)  # type: ignore[arg-type]


def conf_lines(spec: BrokerSpec) -> list[str]:
    return [line for line in conf_text(spec).splitlines() if line and not line.startswith("#")]


# --- passwords ----------------------------------------------------------------------------------------------


def test_hash_matches_mosquitto_passwd_vector() -> None:
    # Produced by `mosquitto_passwd -c -b pw alice secret` (Mosquitto 2.0.11).
    line = (
        "alice:$7$101$Zz5J5HImdMYgO8xV$tOEvVMUKIiyhSGdiocHImwS95tsA84/LI/izuUjndfYccmUOe2Vg4kc5RMFvNcfsM7jX5s"
        "McXvZHHVJ12D352A=="
    )
    salt = base64.b64decode("Zz5J5HImdMYgO8xV")
    assert "alice:" + hash_password("secret", salt=salt, iterations=101) == line


def test_hash_is_salted() -> None:
    a, b = hash_password("same"), hash_password("same")
    assert a != b
    assert a.startswith("$7$210000$")  # OWASP's count for PBKDF2-HMAC-SHA512 (mosquitto_passwd writes 101)
    _, _, iterations, salt, digest = a.split("$")
    assert (iterations, len(base64.b64decode(salt)), len(base64.b64decode(digest))) == ("210000", 12, 64)


def test_generated_passwords_are_long_and_distinct() -> None:
    passwords = {generate_password() for _ in range(100)}
    assert len(passwords) == 100
    assert min(len(p) for p in passwords) >= 40


def test_mosquitto_accepts_a_python_generated_password_file_of_100_parties(
    tmp_path: Path, connect_as: ConnectAs
) -> None:
    from tests.broker_fixtures import BrokerHandle

    parties = [Identity(f"r{n}", generate_password()) for n in range(100)]
    # Generated passwords: the count for them (at 210,000 iterations these 101 hashes take ~20 s to write).
    spec = hub_spec(tmp_path, port=free_port(), parties=parties, password_iterations=GENERATED_PASSWORD_ITERATIONS)
    t0 = time.perf_counter()
    render(spec)
    assert time.perf_counter() - t0 < 1.0
    with MosquittoProcess(spec) as process:
        handle = BrokerHandle(spec.host, spec.port, spec.identities, process)
        for username in ["hub", "r0", "r57", "r99"]:
            assert not connect_as(handle, username).connack.is_failure  # type: ignore[union-attr]
        assert connect_as(handle, "r1", password=parties[2].password, connect=False).connect().is_failure


# --- files --------------------------------------------------------------------------------------------------


def test_render_writes_three_files_secrets_0600(tmp_path: Path) -> None:
    spec = hub_spec(tmp_path)
    conf = render(spec)
    assert conf == spec.conf_path
    assert stat.S_IMODE(spec.password_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(spec.acl_path.stat().st_mode) == 0o600
    users = [line.split(":", 1)[0] for line in spec.password_path.read_text().splitlines()]
    assert users == ["hub", "r1", "r2"]
    assert "r1-pw" not in spec.password_path.read_text()
    assert not list(spec.data_dir.glob(".*.tmp"))


def test_render_again_keeps_modes_and_replaces_content(tmp_path: Path) -> None:
    spec = hub_spec(tmp_path)
    render(spec)
    spec.password_path.chmod(0o644)
    spec.parties.append(Identity("r3", "r3-pw"))
    render(spec)
    assert stat.S_IMODE(spec.password_path.stat().st_mode) == 0o600
    assert len(spec.password_path.read_text().splitlines()) == 4


def test_conf_has_the_required_settings(tmp_path: Path) -> None:
    spec = hub_spec(tmp_path, host="127.0.0.2", port=1999)
    lines = conf_lines(spec)
    data_dir = spec.data_dir.absolute()
    for expected in [
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {data_dir}/passwords",
        f"acl_file {data_dir}/acl",
        "listener 1999 127.0.0.2",
        "use_username_as_clientid true",
        "set_tcp_nodelay true",
        "max_inflight_messages 1000",
        "max_queued_messages 100000",
        "max_queued_bytes 67108864",
        "max_packet_size 262144",
        "persistence true",
        f"persistence_location {data_dir}/",
        "autosave_interval 10",
        f"log_dest file {data_dir}/mosquitto.log",
        "log_timestamp true",
    ]:
        assert expected in lines, expected
    assert sum(line.startswith("listener ") for line in lines) == 1
    assert lines.index("per_listener_settings false") < lines.index("listener 1999 127.0.0.2")
    assert not any(line.startswith(("port ", "bind_address")) for line in lines)


def test_conf_tuning_is_passed_through(tmp_path: Path) -> None:
    spec = hub_spec(
        tmp_path,
        max_inflight_messages=0,
        max_queued_messages=0,
        max_queued_bytes=4096,
        max_packet_size=1024,
        autosave_interval=60,
        use_username_as_clientid=False,
    )
    lines = conf_lines(spec)
    for expected in [
        "max_inflight_messages 0",
        "max_queued_messages 0",
        "max_queued_bytes 4096",
        "max_packet_size 1024",
        "autosave_interval 60",
        "use_username_as_clientid false",
    ]:
        assert expected in lines


def test_hub_and_retailer_share_one_conf(tmp_path: Path) -> None:
    """One template serves both kinds: with the same port and data_dir only the ACL file's content differs."""
    hub = hub_spec(tmp_path)
    retailer = BrokerSpec(kind="retailer", port=hub.port, data_dir=hub.data_dir, privileged=Identity("bridge", "p"))
    assert conf_lines(hub) == conf_lines(retailer)
    assert acl_text(hub) != acl_text(retailer)


# --- ACL ----------------------------------------------------------------------------------------------------


def acl_lines(spec: BrokerSpec) -> list[str]:
    return [line for line in acl_text(spec).splitlines() if line and not line.startswith("#")]


@pytest.mark.parametrize(("kind", "party_kind"), [("hub", "retailers"), ("retailer", "gateways")])
def test_acl_is_generated_from_the_topic_rules(tmp_path: Path, kind: str, party_kind: topics.PartyKind) -> None:
    spec = BrokerSpec(
        kind=kind,  # type: ignore[arg-type]
        port=1,
        data_dir=tmp_path,
        privileged=Identity("hub" if kind == "hub" else "bridge", "p"),
        parties=[Identity("p1", "x")],
        extra_privileged=[Identity("observer", "o")],
    )
    lines = acl_lines(spec)
    patterns = [f"pattern {access} {topic}" for access, topic in topics.acl_patterns(party_kind)]
    assert lines[: len(patterns)] == patterns  # before any user line
    assert lines[len(patterns) :] == [
        f"user {spec.privileged.username}",
        f"topic readwrite {topics.PRIVILEGED_ACL}",
        "topic read $SYS/#",
        "user observer",
        f"topic readwrite {topics.PRIVILEGED_ACL}",
        "topic read $SYS/#",
    ]
    assert "p1" not in acl_text(spec)  # parties get patterns only


# --- validation ---------------------------------------------------------------------------------------------


def test_privileged_may_use_reserved_names(tmp_path: Path) -> None:
    for name in sorted(topics.RESERVED_IDS):
        assert validate(hub_spec(tmp_path, privileged=Identity(name, "p"))) == []


@pytest.mark.parametrize("name", sorted(topics.RESERVED_IDS))
def test_party_with_reserved_name_is_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(BrokerConfigError, match=f"'{name}': reserved name"):
        render(hub_spec(tmp_path, parties=[Identity(name, "p")]))


@pytest.mark.parametrize("name", ["", "a/b", "+", "#", "r 1", "-r1", "x" * 65, "r1:", "%u"])
def test_invalid_usernames_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(BrokerConfigError, match="invalid id"):
        render(hub_spec(tmp_path, parties=[Identity(name, "p")]))
    with pytest.raises(BrokerConfigError, match="invalid id"):
        render(hub_spec(tmp_path, privileged=Identity(name, "p")))


def test_every_error_is_reported_at_once(tmp_path: Path) -> None:
    spec = hub_spec(
        tmp_path,
        port=0,
        privileged=Identity("hub", ""),
        parties=[Identity("r1", "a"), Identity("r1", "b"), Identity("admin", "c")],
        extra_privileged=[Identity("hub", "d")],
        max_queued_messages=-1,
        data_dir=tmp_path / "with space",
    )
    with pytest.raises(BrokerConfigError) as info:
        render(spec)
    messages = info.value.errors
    assert len(messages) == 7, messages
    assert not (tmp_path / "with space").exists()


def test_tls_must_be_a_broker_tls_with_files_that_exist(tmp_path: Path) -> None:
    spec = hub_spec(tmp_path)
    spec.tls = object()  # type: ignore[assignment]
    with pytest.raises(BrokerConfigError, match="BrokerTls"):
        render(spec)


def test_identity_repr_hides_the_password() -> None:
    assert "s3cret" not in repr(Identity("r1", "s3cret"))


# --- command line -------------------------------------------------------------------------------------------


def test_cli_render(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ids = tmp_path / "ids.json"
    ids.write_text(
        json.dumps(
            {
                "privileged": {"username": "bridge", "password": "b"},
                "parties": [{"username": "gw-1", "password": "g"}],
                "extra_privileged": [{"username": "sim", "password": "s"}],
            }
        )
    )
    data_dir = tmp_path / "retailer"
    argv = ["render", "--kind", "retailer", "--port", "1884", "--data-dir", str(data_dir)]
    assert cli_main([*argv, "--identities-json", str(ids)]) == 0
    assert capsys.readouterr().out.strip() == str(data_dir / "mosquitto.conf")
    assert "pattern read mhp/v1/gateways/%u/down/#" in (data_dir / "acl").read_text()
    assert "user sim" in (data_dir / "acl").read_text()

    ids.write_text(
        json.dumps({"privileged": {"username": "bridge", "password": "b"}, "parties": [{"username": "hub"}]})
    )
    assert cli_main([*argv, "--identities-json", str(ids)]) == 2
    assert "parties[0]" in capsys.readouterr().err


def test_cli_as_module(tmp_path: Path) -> None:
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps({"privileged": {"username": "hub", "password": "h"}}))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "broker_config",
            "render",
            "--kind",
            "hub",
            "--port",
            "1883",
            "--data-dir",
            str(tmp_path / "d"),
            "--identities-json",
            str(ids),
        ],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "d" / "passwords").read_text().startswith("hub:$7$210000$")


def test_cli_binds_client_ids_to_usernames_unless_told_otherwise(tmp_path: Path) -> None:
    """``python -m broker_config render|run`` renders ``use_username_as_clientid true`` (client-id takeover); the
    opt-out is explicit."""
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps({"privileged": {"username": "hub", "password": "h"}}))
    argv = ["render", "--kind", "hub", "--port", "1883", "--identities-json", str(ids)]
    assert cli_main([*argv, "--data-dir", str(tmp_path / "on")]) == 0
    assert "use_username_as_clientid true" in (tmp_path / "on" / "mosquitto.conf").read_text().splitlines()
    assert cli_main([*argv, "--data-dir", str(tmp_path / "off"), "--no-use-username-as-clientid"]) == 0
    assert "use_username_as_clientid false" in (tmp_path / "off" / "mosquitto.conf").read_text().splitlines()


def test_max_queued_bytes_caps_an_offline_clients_queue(
    mosquitto_factory: MosquittoFactory, connect_as: ConnectAs
) -> None:
    """The rendered ``max_queued_bytes`` is Mosquitto's: beyond it, messages for an offline session are dropped
    (the hub's and the bridges' outboxes re-send them), so one client cannot make the broker hold without bound."""
    broker = mosquitto_factory("hub", ["r1"], "hub", max_queued_bytes=4096)
    assert "max_queued_bytes 4096" in broker.spec.conf_path.read_text().splitlines()
    r1 = connect_as(broker, "r1", clean_start=False, session_expiry=3600)
    assert not r1.subscribe(topics.down("retailers", "r1")).is_failure
    r1.disconnect()
    hub = connect_as(broker, "hub")
    for n in range(8):  # 8 KiB for a queue of 4 KiB
        assert not hub.publish(topics.down("retailers", "r1"), bytes([n]) * 1024).is_failure  # type: ignore[union-attr]
    r1.connect()
    assert r1.session_present is True
    assert not hub.publish(topics.down("retailers", "r1"), b"online again").is_failure  # type: ignore[union-attr]
    got: list[bytes] = []
    while not got or got[-1] != b"online again":
        got.append(r1.next_message().payload)
    kept = got[:-1]
    assert 0 < len(kept) < 8, f"{len(kept)} of 8 queued messages kept: the queue was not capped"
    assert kept == [bytes([n]) * 1024 for n in range(len(kept))], "what was kept is the oldest, in order"


def test_password_hashes_take_their_iteration_count_from_the_spec(tmp_path: Path) -> None:
    spec = hub_spec(tmp_path, password_iterations=1000)
    render(spec)
    assert all(line.split(":", 1)[1].startswith("$7$1000$") for line in spec.password_path.read_text().splitlines())
    with pytest.raises(BrokerConfigError, match="password_iterations"):
        render(hub_spec(tmp_path, password_iterations=0))
