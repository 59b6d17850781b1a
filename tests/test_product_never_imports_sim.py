"""Nothing in the product imports ``sim/`` (the test framework, simulators and the stack launcher): every module of
cloud_hub, retailer_bridge, hems_firmware, device_drivers, dso_console and mhp_wire is imported in a fresh Python
with ``sim`` made unimportable, and none of them may reach it, directly or through another module. The console in
particular runs without anything from ``sim/`` (its own command starts and answers with ``sim`` blocked)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

PRODUCT = ["cloud_hub", "retailer_bridge", "hems_firmware", "device_drivers", "dso_console", "mhp_wire"]

IMPORT_ALL = textwrap.dedent("""
    import importlib, importlib.abc, json, pkgutil, sys

    class NoSim(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "sim" or name.startswith("sim."):
                raise ImportError(f"the product imported {name}")
            return None

    sys.meta_path.insert(0, NoSim())
    failed, done = {}, []
    for top in PRODUCT:
        package = importlib.import_module(top)
        names = [top] + [m.name for m in pkgutil.walk_packages(package.__path__, top + ".")]
        for name in names:
            if name.endswith("__main__"):
                continue  # runs its command when imported
            try:
                importlib.import_module(name)
                done.append(name)
            except ImportError as exc:
                failed[name] = str(exc)
    print(json.dumps({"failed": failed, "done": done, "sim": sorted(m for m in sys.modules
                                                                    if m == "sim" or m.startswith("sim."))}))
""")


def test_no_module_of_the_product_reaches_sim() -> None:
    code = f"PRODUCT = {PRODUCT!r}\n{IMPORT_ALL}"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["failed"] == {}, result["failed"]
    assert result["sim"] == []
    imported = set(result["done"])
    assert {"dso_console.app", "dso_console.forms", "cloud_hub.app", "retailer_bridge.service",
            "hems_firmware.cli", "mhp_wire.dso_api"} <= imported


def test_the_console_command_runs_with_sim_blocked() -> None:
    code = textwrap.dedent("""
        import importlib.abc, sys
        class NoSim(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "sim" or name.startswith("sim."):
                    raise ImportError(name)
                return None
        sys.meta_path.insert(0, NoSim())
        from dso_console.app import main
        try:
            main(["--help"])
        except SystemExit as exit:
            sys.exit(exit.code)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "--hub-url" in out.stdout and "dso-console" in out.stdout
