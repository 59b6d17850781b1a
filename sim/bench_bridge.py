"""Bridge benchmark: the relay latency a retailer bridge adds, with 1,000 gateways connected.

    python -m sim.bench_bridge --gateways 1000 --requests 30 --clients-per-request 100

Real Mosquitto brokers (hub and retailer), the real bridge (``retailer-bridge run``) as its own process, a fleet
of 1,000 simulated gateways (``sim.fleet``, real MQTT connections, answering at once) in another process, and
this process playing the hub: it sends emergency requests of 100 clients (10 %, the paper's size) and collects
the outcomes. Reported: ``retailer_ms`` as the bridge measures its own handling of each client (request in →
command out, outcome in → outcome out) and the end-to-end time hub → bridge → gateway → bridge → hub per client.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import tomli_w

from broker_config.launcher import BrokerSpec, Identity, MosquittoProcess, die_with_parent, generate_password
from broker_config.render import GENERATED_PASSWORD_ITERATIONS
from mhp_wire import topics
from mhp_wire.messages import (
    Ack,
    ClientState,
    EmergencyParams,
    Outcome,
    Request,
    RequestKind,
    WireError,
    decode,
    encode,
)
from mhp_wire.mqtt import MqttEndpoint, MqttLink
from mhp_wire.secretfile import write_private
from sim.bench_gateway import pct
from sim.stack.stack import free_port


async def bench(n_gateways: int, n_requests: int, per_request: int) -> dict[str, Any]:
    """Run the benchmark; returns its figures."""
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        gws = {f"gw-{i:05d}": {"client_id": f"c-{i:05d}", "password": generate_password()} for i in range(n_gateways)}
        hub_spec = BrokerSpec(kind="hub", port=free_port(), data_dir=tmp / "hub-broker",
                              privileged=Identity("hub", generate_password()), parties=[Identity("r1", "r1-pw")])
        r1_spec = BrokerSpec(kind="retailer", port=free_port(), data_dir=tmp / "r1-broker",
                             privileged=Identity("bridge", generate_password()),
                             parties=[Identity(g, c["password"]) for g, c in gws.items()],
                             password_iterations=GENERATED_PASSWORD_ITERATIONS)  # generated; many gateways
        with MosquittoProcess(hub_spec) as hub_broker, MosquittoProcess(r1_spec) as r1_broker:
            cfg = tmp / "bridge.toml"
            write_private(cfg, tomli_w.dumps({"bridge": {
                "retailer_id": "r1", "hub_mqtt_port": hub_broker.port, "hub_mqtt_password": "r1-pw",
                "local_mqtt_port": r1_broker.port, "local_mqtt_password": r1_spec.privileged.password,
                "db_path": str(tmp / "bridge.db"), "telemetry_store": "none",
                "customers": {c["client_id"]: g for g, c in gws.items()}}}))
            creds = tmp / "fleet.json"
            write_private(creds, json.dumps(gws))
            ready = tmp / "fleet.ready"
            procs = [
                subprocess.Popen([sys.executable, "-m", "retailer_bridge.cli", "--log-level", "WARNING", "run",
                                  "--config", str(cfg)], preexec_fn=die_with_parent()),
                subprocess.Popen([sys.executable, "-m", "sim.fleet", "--port", str(r1_broker.port), "--credentials",
                                  str(creds), "--ready-file", str(ready)], preexec_fn=die_with_parent()),
            ]
            try:
                return await _drive(hub_broker, hub_spec, gws, ready, n_requests, per_request)
            finally:
                for p in procs:
                    p.terminate()
                    p.wait()


async def _drive(hub_broker: MosquittoProcess, hub_spec: BrokerSpec, gws: dict[str, dict[str, str]], ready: Path,
                 n_requests: int, per_request: int) -> dict[str, Any]:
    sent_at: dict[str, float] = {}
    done: dict[tuple[str, str], float] = {}
    retailer_ms: list[float] = []
    waiting: dict[str, asyncio.Event] = {}
    counts: dict[str, int] = {}
    link_box: list[MqttLink] = []

    async def on_message(topic: str, payload: bytes, retained: bool) -> None:
        try:
            msg = decode(payload)
        except WireError:
            return
        if isinstance(msg, Outcome):
            if link_box:
                await link_box[0].publish(topics.down("retailers", "r1"), encode(Ack(ack_ids=[msg.msg_id])),
                                          qos=0)  # as the hub acks (ACK_QOS; a literal so older checkouts run it)
            if msg.state is ClientState.EXECUTED and (msg.request_id, msg.client_id) not in done:
                done[(msg.request_id, msg.client_id)] = time.perf_counter()
                retailer_ms.append(float(msg.trace.get("retailer_ms", 0.0)))
                counts[msg.request_id] = counts.get(msg.request_id, 0) + 1
                if counts[msg.request_id] >= per_request:
                    waiting[msg.request_id].set()

    endpoint = MqttEndpoint(hub_broker.host, hub_broker.port, "hub", hub_spec.privileged.password)
    async with MqttLink(endpoint, client_id="hub", subscriptions=[topics.all_up("retailers")], handler=on_message,
                        clean_start=True, session_expiry_s=0) as link:
        link_box.append(link)
        t0 = time.monotonic()
        while not ready.exists():
            if time.monotonic() - t0 > 120:
                raise TimeoutError("the fleet did not connect")
            await asyncio.sleep(0.1)
        fleet_info = json.loads(ready.read_text())
        await asyncio.sleep(2.0)  # the bridge sees every gateway's presence
        clients = [c["client_id"] for c in gws.values()]
        rng = random.Random(1)
        e2e: list[float] = []
        for i in range(n_requests):
            chosen = rng.sample(clients, per_request)
            start = datetime.now(UTC)
            params = EmergencyParams(start=start, end=start + timedelta(minutes=5), power_limit_kw=1.0)
            req = Request(request_id=f"bench-{i}", kind=RequestKind.EMERGENCY, client_ids=chosen, params=params,
                          expires_at=params.end)
            waiting[req.request_id] = asyncio.Event()
            sent_at[req.request_id] = time.perf_counter()
            await link.publish(topics.down("retailers", "r1"), encode(req))
            await asyncio.wait_for(waiting[req.request_id].wait(), 30)
            e2e += [done[(req.request_id, c)] - sent_at[req.request_id] for c in chosen]
            await asyncio.sleep(0.2)
        ms = [v / 1000 for v in retailer_ms]
        return {"gateways": len(gws), "fleet_connect_s": fleet_info["connect_s"], "requests": n_requests,
                "clients_per_request": per_request, "outcomes": len(done),
                "bridge_retailer_ms_p50": pct(ms, 50), "bridge_retailer_ms_p99": pct(ms, 99),
                "end_to_end_ms_p50": pct(e2e, 50), "end_to_end_ms_p99": pct(e2e, 99),
                "end_to_end_ms_max": round(max(e2e) * 1000, 3)}


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(prog="python -m sim.bench_bridge", description=__doc__.split("\n\n")[0])
    parser.add_argument("--gateways", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--clients-per-request", type=int, default=100)
    args = parser.parse_args(argv)
    result = asyncio.run(bench(args.gateways, args.requests, args.clients_per_request))
    print(json.dumps(result), flush=True)
    print(f"machine: {os.cpu_count()} cores", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
