"""Installer tools: provision writes a valid configuration (from flags or answers), scan finds meters on a real
Modbus TCP bus, the install script lays out the unit, the configuration and the state directory."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from device_drivers.sim.meter import MeterSim
from device_drivers.sim.server import ModbusSimServer
from hems_firmware.config import GatewayConfig
from hems_firmware.installer import parse_device, parse_units, provision, scan

ROOT = Path(__file__).resolve().parents[2]


def args(tmp: Path, **over: object) -> argparse.Namespace:
    password_file = tmp / "gateway-password"
    password_file.write_text("s3cret\n")
    base = {"output": tmp / "gateway.toml", "id": "gw-9", "client_id": "c9", "broker": "10.0.0.2:1884",
            "password": None, "password_file": password_file, "password_stdin": False, "ca_file": None,
            "production": False, "device": ["name=meter,driver=eastron_sdm630,transport=modbus-tcp,host=10.0.0.5,"
                                             "port=502,unit_id=1",
                                             "name=boiler,driver=modbus_relay,transport=modbus-tcp,host=10.0.0.6,"
                                             "port=502,coil=0,rated_power_kw=2.0,sheddable=true,priority=1"],
            "state_dir": tmp / "state", "contracted_power_kw": 6.9, "interactive": False, "force": False}
    base.update(over)
    return argparse.Namespace(**base)


def test_provision_from_flags_writes_a_valid_config(tmp_path: Path) -> None:
    assert provision(args(tmp_path)) == 0
    cfg = GatewayConfig.load(tmp_path / "gateway.toml")
    assert (cfg.gateway.id, cfg.gateway.uplink.host, cfg.gateway.uplink.port) == ("gw-9", "10.0.0.2", 1884)
    assert [d.name for d in cfg.devices] == ["meter", "boiler"]
    assert cfg.devices[1].sheddable and cfg.devices[1].rated_power_kw == 2.0
    assert provision(args(tmp_path)) == 2, "an existing file is not replaced without --force"
    assert provision(args(tmp_path, force=True)) == 0


def test_provision_asks_for_what_is_missing(tmp_path: Path) -> None:
    answers = iter(["gw-7", "c7", "127.0.0.1:1883", "name=m,driver=eastron_sdm120,transport=modbus-rtu,"
                    "serial_port=/dev/ttyUSB0", ""])
    a = args(tmp_path, id=None, client_id=None, broker=None, password_file=None, device=None, interactive=True)
    assert provision(a, ask=lambda q: next(answers), ask_secret=lambda q: "pw") == 0
    data = tomllib.loads((tmp_path / "gateway.toml").read_text())
    assert data["gateway"]["id"] == "gw-7" and data["devices"][0]["driver"] == "eastron_sdm120"


def test_provision_refuses_an_invalid_config_and_missing_answers(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert provision(args(tmp_path, device=["name=m,driver=eastron_sdm630,transport=modbus-tcp"])) == 2
    assert "needs host" in capsys.readouterr().err
    assert not (tmp_path / "gateway.toml").exists()
    assert provision(args(tmp_path, id=None)) == 2
    assert "--id" in capsys.readouterr().err


def test_parsers() -> None:
    assert parse_device("a=1,b=x,c=true,d=2.5") == {"a": 1, "b": "x", "c": True, "d": 2.5}
    with pytest.raises(ValueError, match="key=value"):
        parse_device("oops")
    assert parse_units("1-3,7") == [1, 2, 3, 7]
    with pytest.raises(ValueError, match=r"1\.\.247"):
        parse_units("0-2")


async def test_scan_finds_the_meters_on_a_bus() -> None:
    devices = {2: MeterSim("sdm630"), 5: MeterSim("sdm120")}
    async with ModbusSimServer(devices, port=0) as server:
        found = await scan({"transport": "modbus-tcp", "host": "127.0.0.1", "port": server.port}, [1, 2, 3, 5],
                           timeout_s=0.2)
    assert [(f["unit_id"], f["driver"]) for f in found] == [(2, "eastron_sdm630"), (5, "eastron_sdm120")]
    assert "active_power_kw" in found[0]["readings"]


def test_install_script_lays_out_unit_config_and_state(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    assert provision(args(tmp_path)) == 0
    root = tmp_path / "root"
    out = subprocess.run(["bash", str(ROOT / "scripts" / "install-gateway.sh"), "--root", str(root), "--no-user",
                          "--no-venv", "--config", str(config)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    unit = (root / "etc/systemd/system/hems-gateway.service").read_text()
    for line in ("Type=notify", "User=hems", "SupplementaryGroups=dialout", "WatchdogSec=", "Restart=always",
                 "ExecStart=/opt/hems-gateway/venv/bin/hems-gateway run --config /etc/hems-gateway/gateway.toml"):
        assert line in unit
    assert (root / "etc/hems-gateway/gateway.toml").read_text() == config.read_text()
    assert (root / "var/lib/hems-gateway").is_dir()


def test_an_upgrade_over_a_configuration_this_version_refuses_stops_before_the_service_and_says_what_to_rename(
        tmp_path: Path) -> None:
    """On e3ac111 the script installed over an existing gateway.toml without loading it: a device name the new
    version refuses ("water heater") was found only when the gateway failed to start."""
    assert provision(args(tmp_path)) == 0
    root = tmp_path / "root"
    toml = root / "etc/hems-gateway/gateway.toml"
    toml.parent.mkdir(parents=True)
    toml.write_text((tmp_path / "gateway.toml").read_text().replace('name = "boiler"', 'name = "water heater"'))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    script = ["bash", str(ROOT / "scripts" / "install-gateway.sh"), "--root", str(root), "--no-user", "--no-venv",
              "--python", sys.executable]
    out = subprocess.run(script, capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 1, out.stderr
    assert "'water heater'" in out.stderr and "rename" in out.stderr.lower() and "not (re)started" in out.stderr
    assert not (root / "etc/systemd/system/hems-gateway.service").exists()
    toml.write_text(toml.read_text().replace('"water heater"', '"water_heater"'))
    out = subprocess.run(script, capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert "valid (gateway gw-9, 2 devices)" in out.stdout
    assert (root / "etc/systemd/system/hems-gateway.service").is_file()
    # A refused --config FILE is checked before it is installed: the working file stays.
    working = toml.read_text()
    bad = tmp_path / "bad.toml"
    bad.write_text(working.replace('"water_heater"', '"water heater"'))
    out = subprocess.run([*script, "--config", str(bad)], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 1 and "was not installed" in out.stderr, out.stderr
    assert toml.read_text() == working


def test_cli_scan_and_provision_exit_codes(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "hems_firmware.cli", "scan"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and "--serial-port" in out.stderr


async def test_selftest_reads_every_device_and_names_the_silent_one(tmp_path: Path) -> None:
    import asyncio
    import json

    from device_drivers.sim.home import SimulatedHome
    from tests.broker_fixtures import free_port

    home = SimulatedHome(0.3, [(0, 2.0)])
    async with ModbusSimServer({1: home.meter}, port=0) as meter, ModbusSimServer({1: home.relays}, port=0) as relay:
        dead = free_port()
        config = tmp_path / "gw.toml"
        config.write_text(f"""
[gateway]
id = "gw-1"
client_id = "c1"
[[devices]]
name = "meter"
driver = "eastron_sdm630"
transport = "modbus-tcp"
host = "127.0.0.1"
port = {meter.port}
[[devices]]
name = "boiler"
driver = "modbus_relay"
transport = "modbus-tcp"
host = "127.0.0.1"
port = {relay.port}
coil = 0
[[devices]]
name = "plug-in-the-garage"
driver = "modbus_relay"
transport = "modbus-tcp"
host = "127.0.0.1"
port = {dead}
coil = 0
timeout_s = 0.3
""")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "hems_firmware.cli", "selftest", "--config", str(config), "--json",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1
    result = json.loads(out)["devices"]
    assert result["meter"]["ok"] and result["meter"]["readings"]["active_power_kw"] == pytest.approx(2.3, abs=0.01)
    assert result["boiler"] == {"ok": True, "readings": {"on": True}}
    assert not result["plug-in-the-garage"]["ok"] and str(dead) in result["plug-in-the-garage"]["error"]
    assert b"plug-in-the-garage" in err
