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
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "selftest":
        return _selftest(args)
    from mhp_wire.process import run_service

    return run_service(_run_all(_load(args.config)))


if __name__ == "__main__":
    sys.exit(main())
