"""``mhp-sim``: the test framework's tools: simulated devices and the paper's experiments."""

from __future__ import annotations

import sys

from sim import devices


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mhp-sim``."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print("usage: mhp-sim devices --spec HOMES.json --ports PORTS.json --events EVENTS.jsonl\n"
              "       mhp-sim experiment base --out DIR [--clients N] [--retailers N] [--duration-s S] ...\n"
              "       mhp-sim dso-web --hub-url URL --token-file F (--no-login | --password-hash-file F) "
              "[--host H --port P]\n\n"
              "  devices      serve simulated homes (SDM630 meter + relay board each) over Modbus TCP\n"
              "  experiment   run one of the paper's experiments (DSO and RP simulators against the real hub)\n"
              "  dso-web      an alias of dso-console, the DSO's console (its own package, dso_console/)")
        return 0 if args else 2
    if args[0] == "devices":
        return devices.main(args[1:])
    if args[0] == "experiment":
        from sim.experiment import cli as experiment_cli  # matplotlib only when an experiment runs

        return experiment_cli.main(args[1:])
    if args[0] == "dso-web":  # the console moved to its own package; this name still runs it
        from dso_console import app as console

        return console.main(args[1:], prog="mhp-sim dso-web")
    print(f"mhp-sim: unknown command {args[0]!r} (known: devices, experiment, dso-web)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
