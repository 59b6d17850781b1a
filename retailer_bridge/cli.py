"""``retailer-bridge``: run one retailer's bridge."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pydantic import ValidationError

from mhp_wire.process import run_service


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``retailer-bridge``."""
    parser = argparse.ArgumentParser(prog="retailer-bridge", description="A retailer's bridge to the hub.")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="relay between the hub broker and this retailer's broker")
    run.add_argument("--config", type=Path, help="TOML file with a [bridge] table (env MHP_BRIDGE_* also works)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from retailer_bridge.service import run_bridge
    from retailer_bridge.settings import BridgeSettings

    try:
        settings = BridgeSettings.load(args.config)
    except (ValidationError, ValueError, OSError) as exc:
        print(f"retailer-bridge: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    return run_service(run_bridge(settings))


if __name__ == "__main__":
    sys.exit(main())
