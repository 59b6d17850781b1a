"""Gateway benchmarks: command received → coil written (p50/p99), and the CPU of polling 8 Modbus devices at 1 s.

    python -m sim.bench_gateway --commands 200 --cpu-seconds 60

The gateway runs as its own process (``hems-gateway run``) against a real Mosquitto; the simulated devices
(pymodbus servers) and the bridge's side run in this process. The command latency is measured from the
publish of the command by the bridge's side to the moment the simulated relay board sees the coil written, so
it includes one broker hop on top of the gateway's own work (storing the command, acknowledging, reading the
meter, deciding, writing the coil). The CPU figure is the gateway process's user+system time from /proc.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import tomli_w

from broker_config.launcher import BrokerSpec, Identity, MosquittoProcess, die_with_parent, generate_password
from device_drivers.sim.home import Plug, SimulatedHome
from device_drivers.sim.meter import MeterSim
from device_drivers.sim.server import ModbusSimServer
from mhp_wire import topics
from mhp_wire.messages import Command, EmergencyParams, RequestKind, encode
from mhp_wire.mqtt import MqttEndpoint, MqttLink
from mhp_wire.secretfile import write_private
from sim.stack.stack import free_port


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile, in ms."""
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] * 1000, 3)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def gateway_process(tmp: Path, name: str, broker: MosquittoProcess, password: str, devices: list[dict[str, Any]],
                    **gateway: Any) -> subprocess.Popen[bytes]:
    """Start ``hems-gateway run`` for one config."""
    cfg = {"gateway": {"id": name, "client_id": f"client-{name}", "state_dir": str(tmp / name),
                       "uplink": {"host": broker.host, "port": broker.port, "password": password}, **gateway},
           "devices": devices}
    path = tmp / f"{name}.toml"
    write_private(path, tomli_w.dumps(cfg))
    return subprocess.Popen([sys.executable, "-m", "hems_firmware.cli", "--log-level", "WARNING", "run", "--config",
                             str(path)], preexec_fn=die_with_parent())


async def command_latency(tmp: Path, n: int) -> dict[str, Any]:
    """Publish ``n`` emergency commands that start at once; time each until the first coil is written."""
    pw = generate_password()
    spec = BrokerSpec(kind="retailer", port=free_port(), data_dir=tmp / "broker",
                      privileged=Identity("bridge", generate_password()), parties=[Identity("gw-bench", pw)])
    home = SimulatedHome(0.3, [Plug(0, 2.0, "heater", 1, True)])
    written: asyncio.Queue[float] = asyncio.Queue()
    inner = home.relays.on_change

    def on_change(coil: int, on: bool) -> None:
        if inner is not None:
            inner(coil, on)
        if not on:
            written.put_nowait(time.perf_counter())

    home.relays.on_change = on_change
    with MosquittoProcess(spec) as broker:
        async with ModbusSimServer({1: home.meter}, port=0) as meter, \
                ModbusSimServer({1: home.relays}, port=0) as relay:
            devices = [{"name": "meter", "driver": "eastron_sdm630", "transport": "modbus-tcp", "host": "127.0.0.1",
                        "port": meter.port, "unit_id": 1},
                       {"name": "heater", "driver": "modbus_relay", "transport": "modbus-tcp", "host": "127.0.0.1",
                        "port": relay.port, "unit_id": 1, "coil": 0, "rated_power_kw": 2.0, "sheddable": True,
                        "priority": 1}]
            proc = gateway_process(tmp, "gw-bench", broker, pw, devices, restore_interval_s=0.0,
                                   contracted_power_kw=20.0, poll_interval_s=1.0)
            try:
                async with MqttLink(MqttEndpoint(broker.host, broker.port, "bridge", spec.privileged.password),
                                    client_id="bridge", subscriptions=[topics.all_up("gateways")],
                                    handler=_ignore, clean_start=True, session_expiry_s=0) as link:
                    await _wait(lambda: Path(tmp / "gw-bench").exists(), 20)
                    await asyncio.sleep(2.0)
                    samples = []
                    for i in range(n):
                        start = datetime.now(UTC) - timedelta(seconds=1)
                        params = EmergencyParams(start=start, end=start + timedelta(seconds=1.4), power_limit_kw=1.0)
                        cmd = Command(request_id=f"bench-{i}", client_id="client-gw-bench",
                                      kind=RequestKind.EMERGENCY, params=params, expires_at=params.end)
                        t0 = time.perf_counter()
                        await link.publish(topics.down("gateways", "gw-bench"), encode(cmd))
                        t1 = await asyncio.wait_for(written.get(), 10)
                        samples.append(t1 - t0)
                        await _wait(lambda: home.coil_state(0), 10)  # restored after the end
                    return {"commands": n, "p50_ms": pct(samples, 50), "p90_ms": pct(samples, 90),
                            "p99_ms": pct(samples, 99), "max_ms": round(max(samples) * 1000, 3)}
            finally:
                proc.terminate()
                proc.wait()


async def polling_cpu(tmp: Path, seconds: float, n_devices: int = 8) -> dict[str, Any]:
    """A gateway polling ``n_devices`` SDM630 meters (each its own Modbus TCP server) every second."""
    pw = generate_password()
    spec = BrokerSpec(kind="retailer", port=free_port(), data_dir=tmp / "broker-cpu",
                      privileged=Identity("bridge", generate_password()), parties=[Identity("gw-cpu", pw)])
    with MosquittoProcess(spec) as broker:
        servers = [ModbusSimServer({1: MeterSim("sdm630")}, port=0) for _ in range(n_devices)]
        for s in servers:
            await s.__aenter__()
        try:
            devices = [{"name": f"meter-{i}", "driver": "eastron_sdm630", "transport": "modbus-tcp",
                        "host": "127.0.0.1", "port": s.port, "unit_id": 1} for i, s in enumerate(servers)]
            proc = gateway_process(tmp, "gw-cpu", broker, pw, devices, poll_interval_s=1.0, telemetry_interval_s=5.0)
            try:
                await asyncio.sleep(5.0)  # start-up and imports are not polling
                c0, t0 = cpu_seconds(proc.pid), time.monotonic()
                await asyncio.sleep(seconds)
                c1, t1 = cpu_seconds(proc.pid), time.monotonic()
                return {"devices": n_devices, "poll_interval_s": 1.0, "seconds": round(t1 - t0, 1),
                        "cpu_percent_of_one_core": round(100 * (c1 - c0) / (t1 - t0), 2)}
            finally:
                proc.terminate()
                proc.wait()
        finally:
            for s in servers:
                await s.__aexit__(None, None, None)


async def _ignore(topic: str, payload: bytes, retained: bool) -> None:
    return None


async def _wait(cond: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark set-up did not come up")
        await asyncio.sleep(0.01)


async def run(n: int, cpu_s: float) -> dict[str, Any]:
    """Both benchmarks."""
    with tempfile.TemporaryDirectory() as tmp:
        latency = await command_latency(Path(tmp), n)
        print(json.dumps({"command_to_coil": latency}), flush=True)
        cpu = await polling_cpu(Path(tmp), cpu_s)
        print(json.dumps({"polling_cpu": cpu}), flush=True)
        return {"command_to_coil": latency, "polling_cpu": cpu}


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(prog="python -m sim.bench_gateway", description=__doc__.split("\n\n")[0])
    parser.add_argument("--commands", type=int, default=200)
    parser.add_argument("--cpu-seconds", type=float, default=60.0)
    args = parser.parse_args(argv)
    asyncio.run(run(args.commands, args.cpu_seconds))
    print(f"machine: {os.cpu_count()} cores", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
