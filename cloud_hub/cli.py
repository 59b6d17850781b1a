"""``cloud-hub``: serve the hub, manage its bearer tokens."""

from __future__ import annotations

import argparse
import gc
import logging
import sys
from pathlib import Path

from pydantic import ValidationError


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from cloud_hub.app import create_app
    from cloud_hub.settings import HubSettings

    try:
        settings = HubSettings.load(args.config, http_port=args.port, http_host=args.host, db_path=args.db)
    except ValidationError as exc:
        print(f"cloud-hub: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    from mhp_wire.gc_tuning import YOUNG_THRESHOLD, tune_for_throughput

    # As the bridge's process does: what start-up made (modules, settings; the app is built after) is frozen, and
    # young collections are rarer. In a fan-out the hub allocates a few dicts per client per write (working copies,
    # cells, events) while it holds every open request's state, so CPython's default full collections walked that
    # heap again and again (docs/performance.md, "Issue 14, sixth round: the hub's CPU per client in a fan-out").
    tune_for_throughput()
    logging.getLogger("cloud_hub").info("garbage collector tuned for throughput: %d start-up objects frozen, young "
                                        "collections every %d new objects", gc.get_freeze_count(), YOUNG_THRESHOLD)
    # uvloop and httptools (the hub extra) rather than asyncio's loop and h11: the HTTP and MQTT I/O is most of the
    # hub's CPU per request.
    uvicorn.run(create_app(settings), host=settings.http_host, port=settings.http_port, loop="uvloop",
                http="httptools", log_level=args.log_level.lower(), access_log=False, timeout_graceful_shutdown=3,
                ssl_certfile=settings.tls_certfile, ssl_keyfile=settings.tls_keyfile,
                # Behind a TLS proxy: the client's scheme and address from X-Forwarded-*, believed only from it.
                proxy_headers=settings.behind_tls_proxy, forwarded_allow_ips=settings.forwarded_allow_ips)
    return 0


def _storage_init(args: argparse.Namespace) -> int:
    import asyncio

    from cloud_hub.settings import HubSettings
    from cloud_hub.storage import SCHEMA, StoreUnavailable
    from cloud_hub.store import HubStore

    try:
        settings = HubSettings.load(args.config, db_path=args.db)
    except ValidationError as exc:
        print(f"cloud-hub: invalid settings:\n{exc}", file=sys.stderr)
        return 2

    async def init() -> None:
        store = HubStore.from_settings(settings)
        try:
            await store.open()
            await store.ping()
        finally:
            await store.close()

    try:
        asyncio.run(init())
    except StoreUnavailable as exc:
        print(f"cloud-hub: storage unavailable: {exc}", file=sys.stderr)
        return 1
    where = ", ".join(settings.hbase_hosts) if settings.storage == "hbase" else str(settings.db_path)
    print(f"{settings.storage} storage ready at {where}: tables {', '.join(SCHEMA)}")
    return 0


def _token(args: argparse.Namespace) -> int:
    from cloud_hub.tokens import TokenBook

    try:
        book = TokenBook(args.tokens_file)
        if args.action == "revoke":
            print(f"revoked {book.revoke(args.principal, keep_newest=args.keep_newest)} token(s) of {args.principal}")
        else:
            print(book.issue(args.principal, expires_in_s=args.expires_in))
    except ValueError as exc:
        print(f"cloud-hub: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``cloud-hub``."""
    parser = argparse.ArgumentParser(prog="cloud-hub", description="The Market Hub Platform's hub.")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP API and the MQTT relay")
    serve.add_argument("--config", type=Path, help="TOML file with a [hub] table (env MHP_HUB_* also works)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--db", type=Path, help="SQLite file of the embedded store")
    serve.set_defaults(fn=_serve)
    storage = sub.add_parser("storage", help="storage administration")
    storage_sub = storage.add_subparsers(dest="storage_command", required=True)
    init = storage_sub.add_parser("init", help="create the tables that are missing (idempotent)")
    init.add_argument("--config", type=Path)
    init.add_argument("--db", type=Path, help="SQLite file of the embedded store")
    init.set_defaults(fn=_storage_init)
    tok = sub.add_parser("token", help="issue a bearer token (its hash is stored, the token printed once)")
    tok.add_argument("--tokens-file", type=Path, required=True)
    tok.add_argument("--principal", required=True, help="dso, admin or retailer:<id>")
    tok.add_argument("action", nargs="?", choices=["issue", "revoke"], default="issue",
                     help="issue (default) a new token, or revoke every token of the principal")
    tok.add_argument("--expires-in", type=float, metavar="SECONDS", help="issue: the token expires after this")
    tok.add_argument("--keep-newest", action="store_true",
                     help="revoke: keep the principal's newest token (rotation: issue, then revoke --keep-newest)")
    tok.set_defaults(fn=_token)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
