"""``hems-gateway``: run the gateway daemon, or self-test its devices."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hems_firmware.config import GatewayConfig


def _load(paths: list[Path]) -> list[GatewayConfig]:
    from hems_firmware.config import ConfigError, GatewayConfig

    configs = []
    for p in paths:
        try:
            configs.append(GatewayConfig.load(p))
        except ConfigError as exc:
            print(f"hems-gateway: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
    return configs


async def _run_all(configs: list[GatewayConfig]) -> None:
    from hems_firmware.daemon import Gateway

    async with asyncio.TaskGroup() as tg:
        for cfg in configs:
            tg.create_task(Gateway(cfg).run(), name=f"gateway-{cfg.gateway.id}")


def _selftest(args: argparse.Namespace) -> int:
    from hems_firmware.daemon import selftest

    (cfg,) = _load([args.config])
    result = asyncio.run(selftest(cfg))
    failed = [name for name, d in result["devices"].items() if not d["ok"]]
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for name, d in result["devices"].items():
            print(f"{'OK  ' if d['ok'] else 'FAIL'} {name}: {d['readings'] if d['ok'] else d['error']}")
    if failed:
        print(f"hems-gateway: no answer from {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _provision(args: argparse.Namespace) -> int:
    from hems_firmware.installer import provision

    try:
        return provision(args)
    except ValueError as exc:
        print(f"hems-gateway provision: {exc}", file=sys.stderr)
        return 2


def _scan(args: argparse.Namespace) -> int:
    from hems_firmware.installer import parse_units, scan

    if bool(args.serial_port) == bool(args.host):
        print("hems-gateway scan: give --serial-port (Modbus RTU) or --host (Modbus TCP / RTU over TCP)",
              file=sys.stderr)
        return 2
    if args.serial_port:
        conn = {"transport": "modbus-rtu", "serial_port": args.serial_port, "baudrate": args.baudrate,
                "parity": args.parity, "stopbits": args.stopbits}
    else:
        conn = {"transport": "modbus-rtu-over-tcp" if args.rtu_over_tcp else "modbus-tcp", "host": args.host,
                "port": args.port}
    try:
        units = parse_units(args.units)
    except ValueError as exc:
        print(f"hems-gateway scan: {exc}", file=sys.stderr)
        return 2
    found = asyncio.run(scan(conn, units, args.timeout))
    if args.json:
        print(json.dumps({"found": found}, indent=2))
    else:
        for f in found:
            print(f"unit {f['unit_id']:>3}: {f['driver']}  {f['readings']}")
        print(f"{len(found)} meter(s) found on {len(units)} unit id(s)")
    return 0 if found else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``hems-gateway``."""
    parser = argparse.ArgumentParser(prog="hems-gateway", description="The home energy management gateway.")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the daemon (several --config run several homes in one process)")
    run.add_argument("--config", type=Path, action="append", required=True)
    st = sub.add_parser("selftest", help="read every configured device once")
    st.add_argument("--config", type=Path, required=True)
    st.add_argument("--json", action="store_true")
    prov = sub.add_parser("provision", help="write a gateway configuration from flags (or questions)")
    prov.add_argument("--output", type=Path, required=True)
    prov.add_argument("--id")
    prov.add_argument("--client-id")
    prov.add_argument("--broker", help="the retailer broker, host:port")
    # --password stays known only to refuse it with a clear message: a password on argv is readable by every user
    # of the box (ps, /proc/PID/cmdline) and kept in shell history.
    prov.add_argument("--password", help=argparse.SUPPRESS)
    pw = prov.add_mutually_exclusive_group()
    pw.add_argument("--password-file", type=Path, help="read this gateway's MQTT password from the file's first line")
    pw.add_argument("--password-stdin", action="store_true",
                    help="read this gateway's MQTT password from the first line of standard input")
    prov.add_argument("--ca-file", type=Path, help="the CA of the retailer broker's certificate: the uplink is TLS")
    prov.add_argument("--production", action="store_true",
                      help='environment "production": the gateway then refuses to run without TLS and a password')
    prov.add_argument("--device", action="append",
                      help="key=value,... of one [[devices]] entry (repeat), e.g. "
                           "name=meter,driver=eastron_sdm630,transport=modbus-rtu,serial_port=/dev/ttyUSB0")
    prov.add_argument("--state-dir", type=Path, default=Path("/var/lib/hems-gateway"))
    prov.add_argument("--contracted-power-kw", type=float)
    prov.add_argument("--interactive", action="store_true", help="ask for what is missing even without a tty")
    prov.add_argument("--force", action="store_true", help="replace an existing file")
    sc = sub.add_parser("scan", help="find known meters on a Modbus bus by probing unit ids")
    sc.add_argument("--serial-port")
    sc.add_argument("--baudrate", type=int, default=9600)
    sc.add_argument("--parity", default="N", choices=["N", "E", "O"])
    sc.add_argument("--stopbits", type=int, default=1)
    sc.add_argument("--host")
    sc.add_argument("--port", type=int, default=502)
    sc.add_argument("--rtu-over-tcp", action="store_true", help="a serial-to-Ethernet converter in RTU mode")
    sc.add_argument("--units", default="1-247", help="unit ids to probe, e.g. 1-10,20")
    sc.add_argument("--timeout", type=float, default=0.3, help="seconds to wait for each answer")
    sc.add_argument("--json", action="store_true")
    ck = sub.add_parser("check", help="validate configuration files as this version loads them (exit 2 if not)")
    ck.add_argument("--config", type=Path, action="append", required=True)
    wa = sub.add_parser("watch", help="follow a gateway's live page in the terminal (actuations and power)")
    wa.add_argument("--url", required=True, help="the gateway's page, e.g. http://127.0.0.1:8080")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "selftest":
        return _selftest(args)
    if args.command == "provision":
        return _provision(args)
    if args.command == "scan":
        return _scan(args)
    if args.command == "check":
        for cfg, path in zip(_load(args.config), args.config, strict=True):
            print(f"hems-gateway: {path}: valid (gateway {cfg.gateway.id}, {len(cfg.devices)} devices)")
        return 0
    if args.command == "watch":
        from hems_firmware.watch import main as watch

        return watch(args.url)
    from mhp_wire.process import run_service

    return run_service(_run_all(_load(args.config)))


if __name__ == "__main__":
    sys.exit(main())
