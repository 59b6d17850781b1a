"""Installer tools: ``hems-gateway provision`` writes a configuration from flags or questions, ``hems-gateway
scan`` finds known meters on a Modbus bus by probing unit ids."""

from __future__ import annotations

import argparse
import getpass
import ssl
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import tomli_w
from pydantic import ValidationError

from device_drivers.config import DeviceConfig
from device_drivers.errors import DeviceError
from device_drivers.modbus import BusPool
from device_drivers.registry import build_device
from hems_firmware.config import GatewayConfig
from mhp_wire.secretfile import write_private

METER_PROBES = ("eastron_sdm630", "eastron_sdm120")
"""Drivers tried, in order, on each unit id: the first that reads its whole map names the meter."""


def parse_device(spec: str) -> dict[str, Any]:
    """``name=meter,driver=eastron_sdm630,transport=modbus-tcp,host=10.0.0.5,port=502`` to a device table."""
    out: dict[str, Any] = {}
    for part in spec.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--device {spec!r}: expected key=value pairs separated by commas")
        v: Any = value.strip()
        if v.lower() in ("true", "false"):
            v = v.lower() == "true"
        else:
            for cast in (int, float):
                try:
                    v = cast(v)
                    break
                except ValueError:
                    continue
        out[key.strip()] = v
    return out


QUESTIONS = [
    ("id", "Gateway id (also its MQTT username)"),
    ("client_id", "The home's client id at the DSO"),
    ("broker", "Retailer broker host:port"),
]
PASSWORD_QUESTION = "MQTT password of this gateway: "


def read_password(args: argparse.Namespace, stdin: TextIO) -> str | None:
    """The gateway's MQTT password from ``--password-file`` (its first line) or ``--password-stdin`` (the first
    line of standard input); None when neither was given. Never from the command line: other users see a
    process's arguments (``ps``), and shells keep them in their history. ValueError says what is wrong."""
    if getattr(args, "password", None) is not None:
        raise ValueError("a password on the command line is refused (other users see it in ps, the shell keeps "
                         "it in its history): give --password-file PATH or --password-stdin")
    if args.password_file is not None and args.password_stdin:
        raise ValueError("give --password-file or --password-stdin, not both")
    if args.password_file is not None:
        try:
            lines = Path(args.password_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read the password file: {exc}") from None
        password = lines[0] if lines else ""
    elif args.password_stdin:
        password = stdin.readline().rstrip("\r\n")
    else:
        return None
    if not password:
        raise ValueError("the password read is empty")
    return password


def read_ca_file(path: Path | None) -> str | None:
    """The absolute path of ``--ca-file`` once it loads as a CA bundle; ValueError when it does not."""
    if path is None:
        return None
    try:
        ssl.create_default_context(cafile=str(path))
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"--ca-file {path}: not a readable CA certificate (PEM): {exc}") from None
    return str(Path(path).resolve())


def provision(args: argparse.Namespace, ask: Callable[[str], str] = input,
              ask_secret: Callable[[str], str] = getpass.getpass, stdin: TextIO | None = None) -> int:
    """Write a validated gateway configuration; ask for what the flags did not give when a person is there.

    The password comes from ``--password-file`` or ``--password-stdin``, or is asked without echo; ValueError
    when it is given on the command line or cannot be read, or when ``--ca-file`` is not a CA certificate."""
    stdin = sys.stdin if stdin is None else stdin
    password = read_password(args, stdin)
    ca_file = read_ca_file(getattr(args, "ca_file", None))
    answers = {k: getattr(args, k) for k, _ in QUESTIONS}
    missing = [(k, q) for k, q in QUESTIONS if not answers[k]]
    can_ask = args.interactive or sys.stdin.isatty()
    if (missing or password is None) and not can_ask:
        names = [f"--{k.replace('_', '-')}" for k, _ in missing]
        names += ["--password-file or --password-stdin"] if password is None else []
        print(f"hems-gateway provision: missing {', '.join(names)} (or run it in a terminal to be asked)",
              file=sys.stderr)
        return 2
    for key, question in missing:
        answers[key] = ask(f"{question}: ").strip()
    if password is None:
        password = ask_secret(PASSWORD_QUESTION)
    devices = [parse_device(d) for d in args.device or []]
    if not devices and (args.interactive or sys.stdin.isatty()):
        while True:
            spec = ask("A device as key=value,... (empty line to finish): ").strip()
            if not spec:
                break
            devices.append(parse_device(spec))
    host, _, port = str(answers["broker"]).rpartition(":") if ":" in str(answers["broker"]) else (
        answers["broker"], "", "1883")
    gateway: dict[str, Any] = {"id": answers["id"], "client_id": answers["client_id"],
                               "state_dir": str(args.state_dir),
                               "uplink": {"host": host, "port": int(port), "password": password}}
    if ca_file is not None:
        gateway["uplink"]["tls_ca_file"] = ca_file
    if getattr(args, "production", False):
        gateway["environment"] = "production"
    if args.contracted_power_kw:
        gateway["contracted_power_kw"] = args.contracted_power_kw
    data: dict[str, Any] = {"gateway": gateway, "devices": devices}
    try:
        GatewayConfig.model_validate(data)
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        print("hems-gateway provision: the configuration would be invalid:\n" + "\n".join(lines), file=sys.stderr)
        return 2
    out = Path(args.output)
    if out.exists() and not args.force:
        print(f"hems-gateway provision: {out} exists (use --force to replace it)", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    write_private(out, tomli_w.dumps(data), 0o640)
    print(f"wrote {out} ({len(devices)} device(s)); check it with: hems-gateway selftest --config {out}")
    return 0


async def scan(conn: dict[str, Any], units: list[int], timeout_s: float) -> list[dict[str, Any]]:
    """Probe each unit id on one bus; returns ``{"unit_id", "driver", "readings"}`` for every meter that answers."""
    found = []
    async with BusPool() as pool:
        for unit in units:
            for driver in METER_PROBES:
                cfg = DeviceConfig.model_validate({"name": f"probe-{unit}-{driver}", "driver": driver,
                                                   "unit_id": unit, "timeout_s": timeout_s, **conn})
                try:
                    readings = await build_device(cfg, pool).read()
                except DeviceError:
                    continue
                found.append({"unit_id": unit, "driver": driver, "readings": readings})
                break
    return found


def parse_units(text: str) -> list[int]:
    """``1-10,20`` to unit ids (1..247)."""
    units: list[int] = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        units += list(range(int(a), int(b or a) + 1))
    bad = [u for u in units if not 1 <= u <= 247]
    if bad:
        raise ValueError(f"unit ids must be 1..247, not {bad[:5]}")
    return units
