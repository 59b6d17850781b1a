"""Command line: ``python -m broker_config render|run --kind hub --port N --data-dir D --identities-json FILE``.

The identities file is JSON::

    {"privileged": {"username": "hub", "password": "..."},
     "parties": [{"username": "r1", "password": "..."}],
     "extra_privileged": [{"username": "sim", "password": "..."}]}

``render`` writes the configuration and prints the path of ``mosquitto.conf``; ``run`` renders and then replaces
itself with ``mosquitto -c <conf>`` in the foreground; ``--tls-cafile/--tls-certfile/--tls-keyfile`` (and
``--require-certificate``) make its listener TLS; ``--environment production`` refuses to go without them.
Client ids are bound to usernames (``use_username_as_clientid``) unless ``--no-use-username-as-clientid``; password
hashes use ``--password-iterations`` (default 210,000).

``python -m broker_config tls --out DIR --hosts 127.0.0.1,localhost [--servers broker,hub] [--names r1,gw-1]``
creates a CA in DIR (or reuses the one there) and, signed by it, a server certificate per ``--servers`` name for
the hosts, and a client certificate per ``--names`` identity (mutual TLS). Keys are mode 0600; DIR must be outside
the git work tree (or git-ignored).
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
from .render import PBKDF2_ITERATIONS, BrokerSpec, BrokerTls, Identity, render


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
    parser.add_argument("--max-queued-bytes", type=int, default=64 * 1024 * 1024)
    parser.add_argument("--max-packet-size", type=int, default=256 * 1024)
    parser.add_argument("--autosave-interval", type=int, default=10)
    parser.add_argument("--password-iterations", type=int, default=PBKDF2_ITERATIONS,
                        help=f"PBKDF2-SHA512 iterations of the password hashes (default {PBKDF2_ITERATIONS:,})")
    parser.add_argument("--use-username-as-clientid", action=argparse.BooleanOptionalAction, default=True,
                        help="replace each client id by the username (default: on), so that no identity can take "
                             "over another's session by reusing its client id; --no-use-username-as-clientid only "
                             "where all users trust each other")
    parser.add_argument("--tls-cafile", type=Path, help="with --tls-certfile and --tls-keyfile: a TLS listener")
    parser.add_argument("--tls-certfile", type=Path)
    parser.add_argument("--tls-keyfile", type=Path)
    parser.add_argument("--require-certificate", action="store_true", help="mutual TLS: clients need a certificate")
    parser.add_argument("--environment", choices=["development", "production"], default="development",
                        help="production: refuse to render or run a listener without TLS")
    return parser


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _tls_main(argv: list[str]) -> int:
    """``python -m broker_config tls``: a CA and certificates signed by it."""
    from .tls import TlsError, create_pki

    parser = argparse.ArgumentParser(prog="python -m broker_config tls",
                                     description="Create a CA and server/client certificates signed by it.")
    parser.add_argument("--out", type=Path, required=True, help="directory for the CA, certificates and keys")
    parser.add_argument("--hosts", type=_csv, required=True, help="host names and IPs of the servers, comma-separated")
    parser.add_argument("--servers", type=_csv, default=["server"], help="server certificate names (default: server)")
    parser.add_argument("--names", type=_csv, default=[], help="client identities that get a client certificate")
    args = parser.parse_args(argv)
    try:
        pki = create_pki(args.out, args.hosts, servers=args.servers, clients=args.names)
    except (OSError, ValueError, TlsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({
        "ca_file": str(pki.ca_file),
        "servers": {n: {"certfile": str(c.certfile), "keyfile": str(c.keyfile)} for n, c in pki.servers.items()},
        "clients": {n: {"certfile": str(c.certfile), "keyfile": str(c.keyfile)} for n, c in pki.clients.items()},
    }, indent=2))
    return 0


def _tls_option(args: argparse.Namespace) -> BrokerTls | None:
    files = (args.tls_cafile, args.tls_certfile, args.tls_keyfile)
    if not any(files):
        if args.require_certificate:
            raise ValueError("--require-certificate needs --tls-cafile, --tls-certfile and --tls-keyfile")
        return None
    if not all(files):
        raise ValueError("a TLS listener needs all of --tls-cafile, --tls-certfile and --tls-keyfile")
    return BrokerTls(args.tls_cafile, args.tls_certfile, args.tls_keyfile, args.require_certificate)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (``run`` does not return on success)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["tls"]:
        return _tls_main(argv[1:])
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
            max_queued_bytes=args.max_queued_bytes,
            max_packet_size=args.max_packet_size,
            autosave_interval=args.autosave_interval,
            password_iterations=args.password_iterations,
            use_username_as_clientid=args.use_username_as_clientid,
            tls=_tls_option(args),
            environment=args.environment,
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
