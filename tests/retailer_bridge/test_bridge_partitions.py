"""A retailer's bridge over several processes, partitioned by gateway (issue 14, item 3; ``retailer_bridge.partition``).

The pure decisions with tables of cases; the settings' refusals; then the real chain through ``mhp-sim experiment
fanout --bridge-partitions 2`` (real hub, hub broker, retailer broker, ``retailer-bridge run`` processes, a fleet of
simulated gateways): an emergency to clients of both partitions executes every client once, each partition having
handled only its own gateways; and one partition's active process killed with ``kill -9`` mid-fan-out loses
nothing (its standby, on that partition's store and lock, takes over)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from mhp_wire import topics
from mhp_wire.messages import BillingClient, BillingData, EmergencyParams, Request, RequestKind
from retailer_bridge.partition import (
    MAX_PARTITIONS,
    Partition,
    PartitionGate,
    StoreOfAnotherPartition,
    claim_store,
    partition_file,
    partition_of,
)
from retailer_bridge.settings import BridgeSettings

GATEWAYS = 1000
CUSTOMERS = {f"client-{i:05d}": f"gw-{i:05d}" for i in range(40)}


def test_the_partition_of_an_id_is_the_same_in_every_process() -> None:
    """CRC-32, not Python's salted ``hash()``: another interpreter with another hash seed agrees."""
    ids = [f"gw-{i:05d}" for i in range(200)]
    code = ("import json, sys; from retailer_bridge.partition import partition_of; "
            "print(json.dumps([partition_of(g, k) for k in (2, 3, 7) for g in json.loads(sys.argv[1])]))")
    other = subprocess.run([sys.executable, "-c", code, json.dumps(ids)], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert json.loads(other.stdout) == [partition_of(g, k) for k in (2, 3, 7) for g in ids]


@pytest.mark.parametrize("count", [1, 2, 3, 8])
def test_gateways_spread_evenly_and_each_has_exactly_one_owner(count: int) -> None:
    gateways = [f"gw-{i:05d}" for i in range(10_000)]
    owners = [[k for k in range(count) if Partition(k, count).owns_gateway(g)] for g in gateways]
    assert all(len(o) == 1 for o in owners)
    sizes = [sum(1 for o in owners if o == [k]) for k in range(count)]
    assert max(sizes) - min(sizes) <= 0.06 * 10_000 / count, sizes


@pytest.mark.parametrize(("client", "gateway_of", "owner_key"), [
    ("client-00001", {"client-00001": "gw-00001"}, "gw-00001"),  # by its gateway
    ("client-00002", {"client-00002": "gw-x"}, "gw-x"),  # the gateway's hash, not the client's
    ("client-stranger", {}, "client-stranger"),  # no gateway on record: by its own id (it is refused there)
])
def test_a_client_belongs_to_its_gateways_partition(client: str, gateway_of: dict[str, str], owner_key: str) -> None:
    for count in (2, 3, 5):
        owners = [k for k in range(count) if Partition(k, count).owns_client(client, gateway_of)]
        assert owners == [partition_of(owner_key, count)]
    assert Partition().owns_client(client, gateway_of) and Partition().whole


@pytest.mark.parametrize(("index", "count", "says"), [
    (0, 0, "between 1 and"), (2, 2, "between 0 and 1"), (-1, 2, "between 0 and 1"),
    (0, MAX_PARTITIONS + 1, "between 1 and"),
])
def test_an_impossible_partition_is_refused(index: int, count: int, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        Partition(index, count)


def _request(client_ids: list[str]) -> Request:
    start = datetime.now(UTC) + timedelta(minutes=1)
    return Request(request_id="req-1", kind=RequestKind.EMERGENCY, client_ids=client_ids,
                   params=EmergencyParams(start=start, end=start + timedelta(minutes=10), power_limit_kw=2.0),
                   expires_at=start + timedelta(minutes=10))


def test_the_gate_cuts_requests_billing_and_uplinks_to_its_share() -> None:
    gates = [PartitionGate(Partition(k, 2), CUSTOMERS) for k in range(2)]
    everyone = [*CUSTOMERS, "client-stranger"]
    shares = [g.request(_request(everyone)).client_ids for g in gates]
    assert sorted(shares[0] + shares[1]) == sorted(everyone) and not set(shares[0]) & set(shares[1])
    assert all(shares) and gates[0].dropped["request_clients"] == len(shares[1])
    for gate, share in zip(gates, shares, strict=True):
        assert all(gate.partition.owns_client(c, CUSTOMERS) for c in share)
    now = datetime.now(UTC)
    billing = BillingData(request_id="bill-1", period_start=now - timedelta(days=30), period_end=now,
                          clients=[BillingClient(client_id=c, period_start=now - timedelta(days=30), period_end=now,
                                                 readings=[]) for c in CUSTOMERS])
    billed = [[c.client_id for c in g.billing(billing).clients] for g in gates]
    assert sorted(billed[0] + billed[1]) == sorted(CUSTOMERS) and not set(billed[0]) & set(billed[1])
    for gid in CUSTOMERS.values():
        for channel in (topics.up("gateways", gid), topics.telemetry(gid), topics.status("gateways", gid)):
            assert [g.gateway_topic(channel) for g in gates] == [k == partition_of(gid, 2) for k in range(2)]
    assert all(g.gateway_topic(topics.PUBLIC_STATUS) for g in gates)  # not a gateway's: every partition reads it
    whole = PartitionGate(Partition(), CUSTOMERS)
    request = _request(everyone)
    assert whole.request(request) is request and not whole.dropped


@pytest.mark.parametrize(("values", "says"), [
    ({"partitions": 2, "partition": 2}, "partition must be between 0 and 1"),
    ({"partitions": 0}, "greater than or equal to 1"),
    ({"partitions": 2, "partition": 0, "personal_area_port": 8090}, "personal area is served by an unpartitioned"),
    ({"partitions": 2, "partition": 1, "local_mqtt_username": "bridge.p1"}, "needs hub_mqtt_username"),
    ({"partitions": 2, "partition": 1, "hub_mqtt_username": "r1"}, "needs hub_mqtt_username"),
    ({"partitions": 2, "partition": 1, "hub_mqtt_username": "r1.p1"}, "needs local_mqtt_username"),
])
def test_settings_refuse_a_partition_that_would_clash(values: dict[str, Any], says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        BridgeSettings(retailer_id="r1", **values)


def test_settings_of_a_partition_and_their_defaults() -> None:
    plain = BridgeSettings(retailer_id="r1")
    assert (plain.partitions, plain.partition, plain.hub_mqtt_username) == (1, 0, None)
    p1 = BridgeSettings(retailer_id="r1", partitions=2, partition=1, hub_mqtt_username="r1.p1",
                        local_mqtt_username="bridge.p1")
    assert (p1.partitions, p1.partition) == (2, 1)


def _fanout(out: Path, *args: str) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "sim.cli", "experiment", "fanout", "--out", str(out),
                           "--gateways", str(GATEWAYS), "--runs", "1", "--per-fleet", "500",
                           "--bridge-partitions", "2", *args],
                          capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run,) = json.loads((out / "results.json").read_text())["runs"]
    return dict(run)


def _receipts(out: Path, request_id: str) -> dict[str, int]:
    """Each gateway's receipts of the request's command, as the fleet processes counted them."""
    stats = [json.loads(f.read_text()) for f in (out / "run").glob("fleet-*.stats.json")]
    return {g: n for s in stats for g, (n, _) in s["commands"][request_id].items()}


def _owned(gateways: dict[str, int], k: int) -> int:
    return sum(Partition(k, 2).owns_gateway(g) for g in gateways)


def test_an_emergency_to_both_partitions_executes_every_client_once_each_partition_its_own(tmp_path: Path) -> None:
    out = tmp_path / "fanout"
    run = _fanout(out)
    # Every client executed, once: the hub's view has each client once, executed.
    assert run["state"] == "completed", run["states"]
    assert run["states"] == {"executed": GATEWAYS} and run["executed"] == GATEWAYS
    assert run["missing_commands"] == 0
    got = _receipts(out, run["request_id"])
    assert len(got) == GATEWAYS
    # Each partition's store holds the commands of exactly the gateways it owns (none of the other's), so a
    # gateway's command could only come from its own partition; both partitions had some.
    assert run["partitions"] == {f"bridge-r1-p{k}": {"commands": _owned(got, k), "foreign": 0} for k in range(2)}
    assert 0 < _owned(got, 0) < GATEWAYS
    # A command received twice is its own partition's re-send of one whose acknowledgement came after the first
    # re-send's time (0.5 s; it happens on a loaded machine, partitioned or not): the fleet's own count of receipts
    # per gateway is what the experiment reports, and the gateway keeps one command per request.
    assert run["duplicate_commands"] == sum(n - 1 for n in got.values())
    # Both partition processes did the work (CPU during the run), each under its own logins.
    assert run["cpu_s"]["bridge-r1-p0"] > 0 and run["cpu_s"]["bridge-r1-p1"] > 0


def test_one_partition_killed_with_kill_9_mid_emergency_loses_nothing(tmp_path: Path) -> None:
    out = tmp_path / "fanout"
    run = _fanout(out, "--bridge-instances", "2", "--kill-bridge-after-outcomes", "1")
    (kill,) = run["bridge_kills"]
    assert kill["killed"] in ("bridge-r1-p0", "bridge-r1-p0-2"), kill  # partition 0's active process
    assert 0 < kill["hub_outcomes_before"] < GATEWAYS, kill
    survivor = "bridge-r1-p0-2" if kill["killed"] == "bridge-r1-p0" else "bridge-r1-p0"
    assert "took over as the active bridge" in (out / "run" / "logs" / f"{survivor}.log").read_text()
    # Nothing lost: every client executed, the request completed, every gateway got its command.
    assert run["state"] == "completed", run["states"]
    assert run["states"] == {"executed": GATEWAYS} and run["executed"] == GATEWAYS
    assert run["missing_commands"] == 0
    got = _receipts(out, run["request_id"])
    assert run["partitions"] == {f"bridge-r1-p{k}": {"commands": _owned(got, k), "foreign": 0} for k in range(2)}
    # Receipts of the one command per gateway (the fleet's own count): a command whose acknowledgement died with the
    # killed process is sent again by the standby, and a gateway keeps one command per request.
    assert len(got) == GATEWAYS and min(got.values()) >= 1
    assert run["duplicate_commands"] == sum(n - 1 for n in got.values())


def test_the_experiment_refuses_impossible_partitions_with_a_clear_error(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "sim.cli", "experiment", "fanout", "--out", str(tmp_path / "x"),
                           "--gateways", "10", "--bridge-partitions", "0"], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 2 and "--bridge-partitions must be between 1 and" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(("kills", "expected"), [
    ([], {"bridge-r1-p0": 0.5, "hub": 1.0}),
    # killed at 2.25 s of CPU (it had 2.0 at the start of the run); its successor spent 0.5 from 0
    ([{"killed": "bridge-r1-p0", "cpu_s_at_kill": 2.25}], {"bridge-r1-p0": 0.75, "hub": 1.0}),
    ([{"killed": None}], {"bridge-r1-p0": 0.5, "hub": 1.0}),  # nothing was killed (no active process found)
])
def test_a_killed_process_cpu_is_what_it_and_its_successor_spent(kills: list[dict[str, Any]],
                                                                  expected: dict[str, float]) -> None:
    """Before, a process restarted under its name counted its successor's CPU minus its own (negative figures)."""
    from sim.experiment.fanout import cpu_spent

    before, after = {"bridge-r1-p0": 2.0, "hub": 3.0}, {"bridge-r1-p0": 0.5, "hub": 4.0}
    if not any(k.get("killed") for k in kills):
        after = {"bridge-r1-p0": 2.5, "hub": 4.0}
    assert cpu_spent(before, after, kills) == expected


def test_a_store_is_bound_to_its_partition_and_others_are_refused(tmp_path: Path) -> None:
    db = tmp_path / "state" / "bridge-p0.db"
    claim_store(db, Partition(0, 2))  # a new store: bound to partition 0 of 2
    assert partition_file(db).read_text() == "0 of 2\n"
    claim_store(db, Partition(0, 2))  # the same partition again (a restart, its standby): accepted
    for other in (Partition(1, 2), Partition(0, 3)):
        with pytest.raises(StoreOfAnotherPartition, match="store of bridge partition 0 of 2"):
            claim_store(db, other)
    with pytest.raises(StoreOfAnotherPartition, match="this bridge is not partitioned"):
        claim_store(db, Partition())
    used = tmp_path / "bridge.db"
    used.write_bytes(b"")  # a store an unpartitioned bridge has used (no .partition file)
    claim_store(used, Partition())  # still fine for it, and nothing written
    assert not partition_file(used).exists()
    with pytest.raises(StoreOfAnotherPartition, match="was used by an unpartitioned bridge"):
        claim_store(used, Partition(1, 2))


def test_the_bridge_refuses_to_start_on_another_partitions_store_with_a_clear_error(tmp_path: Path) -> None:
    db = tmp_path / "bridge.db"
    claim_store(db, Partition(0, 2))
    cfg = tmp_path / "p1.toml"
    cfg.write_text(f'[bridge]\nretailer_id = "r1"\npartitions = 2\npartition = 1\nhub_mqtt_username = "r1.p1"\n'
                   f'local_mqtt_username = "bridge.p1"\ndb_path = "{db}"\ntelemetry_store = "none"\n')
    proc = subprocess.run([sys.executable, "-m", "retailer_bridge.cli", "run", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "is the store of bridge partition 0 of 2" in proc.stderr and "not of partition 1 of 2" in proc.stderr
