"""Command line: ``python -m broker_config render|run --kind hub --port N --data-dir D --identities-json FILE``.

The identities file is JSON::

    {"privileged": {"username": "hub", "password": "..."},
     "parties": [{"username": "r1", "password": "..."}],
     "extra_privileged": [{"username": "sim", "password": "..."}]}

``render`` writes the configuration and prints the path of ``mosquitto.conf``; ``run`` renders and then replaces
itself with ``mosquitto -c <conf>`` in the foreground.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from .errors import BrokerError
from .launcher import find_mosquitto
from .render import BrokerSpec, Identity, render


def _identity(raw: Any, where: str) -> Identity:
    if (
        not isinstance(raw, dict)
        or not isinstance(raw.get("username"), str)
        or not isinstance(raw.get("password"), str)
    ):
        raise ValueError(f"{where}: expected an object with string 'username' and 'password'")
    return Identity(raw["username"], raw["password"])


def _load_identities(path: Path) -> tuple[Identity, list[Identity], list[Identity]]:
    raw = json.loads(path.read_text("utf-8"))
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object")
    privileged = _identity(raw.get("privileged"), "privileged")
    parties = [_identity(r, f"parties[{n}]") for n, r in enumerate(raw.get("parties", []))]
    extra = [_identity(r, f"extra_privileged[{n}]") for n, r in enumerate(raw.get("extra_privileged", []))]
    return privileged, parties, extra


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m broker_config", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["render", "run"])
    parser.add_argument("--kind", choices=["hub", "retailer"], required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--identities-json", type=Path, required=True)
    parser.add_argument("--max-inflight-messages", type=int, default=1000)
    parser.add_argument("--max-queued-messages", type=int, default=100_000)
    parser.add_argument("--max-packet-size", type=int, default=256 * 1024)
    parser.add_argument("--autosave-interval", type=int, default=10)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (``run`` does not return on success)."""
    args = _parser().parse_args(argv)
    try:
        privileged, parties, extra = _load_identities(args.identities_json)
        spec = BrokerSpec(
            kind=args.kind,
            port=args.port,
            host=args.host,
            data_dir=args.data_dir,
            privileged=privileged,
            parties=parties,
            extra_privileged=extra,
            max_inflight_messages=args.max_inflight_messages,
            max_queued_messages=args.max_queued_messages,
            max_packet_size=args.max_packet_size,
            autosave_interval=args.autosave_interval,
        )
        conf = render(spec)
        if args.command == "run":
            binary = find_mosquitto()
            os.execv(binary, [binary, "-c", str(conf)])
    except (OSError, ValueError, BrokerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(conf)
    return 0


if __name__ == "__main__":
    sys.exit(main())
