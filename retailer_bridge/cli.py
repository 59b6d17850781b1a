"""``retailer-bridge``: run one retailer's bridge."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import sys
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
    return run_service(run_bridge(settings))


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
