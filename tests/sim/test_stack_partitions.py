"""``mhp-stack`` with each retailer's bridge as K partitions by gateway (issue 14, fifth round).

The whole stack as real processes (``Stack``: Mosquitto brokers from ``broker_config/``, ``cloud-hub serve``,
``retailer-bridge run`` per partition, ``hems-gateway run``, simulated Modbus devices): with
``bridge_partitions = 2`` an emergency to clients of both partitions switches every home's sheddable plugs off and
every client ends ``executed``, each partition's store holding the commands of its own gateways only.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from retailer_bridge.partition import Partition
from sim.experiment.fanout import partition_counts
from sim.stack.cli import read_plugs
from sim.stack.stack import PLUGS, Stack
from tests.test_end_to_end import run_emergency


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    s = Stack(tmp_path / "stack", retailers=1, homes=5, log_level="WARNING", bridge_partitions=2)
    try:
        await s.start(timeout_s=90)
        yield s
    finally:
        await s.stop()


async def test_an_emergency_to_clients_of_both_partitions_executes_end_to_end(stack: Stack) -> None:
    info = json.loads((stack.dir / "stack.json").read_text())
    assert info["bridge_partitions"] == 2
    assert {"bridge-r1-p0", "bridge-r1-p1"} <= set(info["processes"]) and "bridge-r1" not in info["processes"]
    assert "r1.p1" in info["brokers"]["hub"]["credentials"]  # partition 1's own login at the hub broker
    assert "bridge.p1" in info["brokers"]["retailers"]["r1"]["credentials"]
    owned = [[h.gateway_id for h in stack.homes if Partition(k, 2).owns_gateway(h.gateway_id)] for k in range(2)]
    assert owned[0] and owned[1], "both partitions serve some of the homes"

    clients = [h["client_id"] for h in info["homes"]]
    req = await run_emergency(stack, clients)
    assert req["state"] == "completed", req
    assert {cid: c["state"] for cid, c in req["clients"].items()} == dict.fromkeys(clients, "executed")
    plugs = await read_plugs(stack)
    for gw, states in plugs.items():
        for p in PLUGS:
            assert states[p["name"]] is (not p["sheddable"]), f"{gw} {p['name']}"
    for k in range(2):
        counts = partition_counts(stack.dir / f"bridge-r1-p{k}.db", req["request_id"], Partition(k, 2))
        assert counts == {"commands": len(owned[k]), "foreign": 0}, (k, counts)


def test_the_stack_refuses_an_impossible_number_of_partitions(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "sim.stack.cli", "up", "--state-dir", str(tmp_path / "s"),
                           "--bridge-partitions", "0"], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2 and "--bridge-partitions must be between 1 and" in proc.stderr, proc.stderr
    assert not (tmp_path / "s").exists()
    with pytest.raises(ValueError, match="bridge partitions must be between 1 and"):
        Stack(tmp_path / "s", bridge_partitions=65)
