"""``retailer-bridge``: run one retailer's bridge, manage its customers' accounts, export its billing data."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import sys
from datetime import datetime
from pathlib import Path

from pydantic import ValidationError

from mhp_wire.process import run_service
from retailer_bridge.settings import BridgeSettings


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``retailer-bridge``."""
    parser = argparse.ArgumentParser(prog="retailer-bridge", description="A retailer's bridge to the hub.")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="relay between the hub broker and this retailer's broker")
    run.add_argument("--config", type=Path, help="TOML file with a [bridge] table (env MHP_BRIDGE_* also works)")
    customer = sub.add_parser("customer", help="customers' accounts for the personal area")
    csub = customer.add_subparsers(dest="customer_command", required=True)
    for name, text in (("add", "create a customer's account"), ("set-password", "change a customer's password "
                                                                               "(their sessions end)")):
        p = csub.add_parser(name, help=text)
        p.add_argument("--config", type=Path, help="the bridge's TOML file (its db_path and customers)")
        p.add_argument("--client-id", required=True)
        if name == "add":
            p.add_argument("--email", required=True)
        p.add_argument("--password-file", type=Path, help="read the password from this file's first line "
                                                          "(default: ask for it)")
    billing = sub.add_parser("billing", help="billing data the hub delivered to this retailer")
    bsub = billing.add_subparsers(dest="billing_command", required=True)
    export = bsub.add_parser("export", help="write the billing intervals of a time range as CSV or JSON")
    export.add_argument("--config", type=Path, help="the bridge's TOML file (its db_path)")
    export.add_argument("--from", dest="start", required=True, type=_aware,
                        help="RFC 3339 time with offset: intervals starting at or after it")
    export.add_argument("--to", dest="end", required=True, type=_aware,
                        help="RFC 3339 time with offset: intervals starting before it")
    export.add_argument("--format", choices=("csv", "json"), default="csv")
    export.add_argument("--client-id", action="append", help="only this client (repeat for more)")
    export.add_argument("--output", type=Path, help="write here instead of standard output")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from retailer_bridge.service import run_bridge

    try:
        settings = BridgeSettings.load(args.config)
    except (ValidationError, ValueError, OSError) as exc:
        print(f"retailer-bridge: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    if args.command == "customer":
        return customer_command(args, settings)
    if args.command == "billing":
        return billing_export(args, settings)
    from retailer_bridge.partition import Partition, StoreOfAnotherPartition, claim_store

    try:
        claim_store(settings.db_path, Partition(settings.partition, settings.partitions))
    except (StoreOfAnotherPartition, OSError) as exc:
        print(f"retailer-bridge: {exc}", file=sys.stderr)
        return 2
    from mhp_wire.gc_tuning import tune_for_throughput

    tune_for_throughput()  # the settings (with the customers) are loaded: they stay, and are never walked again
    # SIGHUP re-reads the installation record (customers, customers_file): gateways added or removed at run time.
    return run_service(run_bridge(settings, reload=lambda: BridgeSettings.load(args.config)))


def _aware(text: str) -> datetime:
    """An RFC 3339 time with its offset (argparse type)."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an RFC 3339 time: {text!r}") from None
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no offset: give one, e.g. {text}+00:00")
    return value


def billing_export(args: argparse.Namespace, settings: BridgeSettings) -> int:
    """``retailer-bridge billing export``: the billing intervals received, read from the bridge's store."""
    from mhp_wire.sqlite import StorageError
    from retailer_bridge.billing import select, to_csv, to_json
    from retailer_bridge.store import BridgeStore

    if args.end <= args.start:
        print("retailer-bridge: --to must be after --from", file=sys.stderr)
        return 2
    if not settings.db_path.exists():
        print(f"retailer-bridge: no bridge store at {settings.db_path} (db_path)", file=sys.stderr)
        return 1
    try:
        readings = BridgeStore.read_billing(settings.db_path, args.start, args.end)
    except StorageError as exc:
        print(f"retailer-bridge: {exc}", file=sys.stderr)
        return 1
    if args.client_id:
        readings = select(readings, args.start, args.end, set(args.client_id))
    text = to_csv(readings) if args.format == "csv" else to_json(readings)
    if args.output is None:
        sys.stdout.write(text)
    else:
        try:
            args.output.write_text(text, encoding="utf-8")
        except OSError as exc:
            print(f"retailer-bridge: cannot write {args.output}: {exc}", file=sys.stderr)
            return 1
    print(f"retailer-bridge: {len(readings)} billing interval(s) exported", file=sys.stderr)
    return 0


def customer_command(args: argparse.Namespace, settings: BridgeSettings) -> int:
    """``retailer-bridge customer add|set-password``: manage an account in the bridge's database."""
    from mhp_wire.sqlite import StorageError
    from retailer_bridge.accounts import AccountError, Accounts, ScryptCost

    if args.client_id not in settings.customers:
        print(f"retailer-bridge: {args.client_id} is not a customer of this bridge (customers, customers_file)",
              file=sys.stderr)
        return 2
    try:
        if args.password_file is not None:
            password = args.password_file.read_text(encoding="utf-8").splitlines()[0]
        else:
            password = getpass.getpass("New password: ")
            if getpass.getpass("Again: ") != password:
                print("retailer-bridge: the passwords differ", file=sys.stderr)
                return 2
    except (OSError, IndexError, UnicodeDecodeError) as exc:
        print(f"retailer-bridge: no password read: {exc or 'empty file'}", file=sys.stderr)
        return 2

    async def apply() -> str:
        accounts = Accounts(settings.db_path, cost=ScryptCost(n=settings.personal_area_scrypt_n))
        await accounts.open()
        try:
            if args.customer_command == "add":
                await accounts.add(args.client_id, args.email, password)
                return f"account of {args.client_id} ({args.email.strip()}) created"
            await accounts.set_password(args.client_id, password)
            return f"password of {args.client_id} changed; their sessions ended"
        finally:
            await accounts.close()

    try:
        print(asyncio.run(apply()))
    except (AccountError, StorageError) as exc:
        print(f"retailer-bridge: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
