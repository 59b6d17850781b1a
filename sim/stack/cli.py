"""``mhp-stack``: ``demo`` runs a scripted scenario on a fresh stack; ``up`` keeps a stack running."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from device_drivers.config import DeviceConfig
from device_drivers.errors import DeviceError
from device_drivers.modbus import BusPool
from device_drivers.registry import build_device
from retailer_bridge.partition import MAX_PARTITIONS
from sim.stack.stack import PLUGS, Stack, StackError

TERMINAL = {"completed", "partially_completed", "failed", "expired", "cancelled"}


def _iso(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


class Timeline:
    """What happened where, printed in time order relative to the scenario's start."""

    def __init__(self) -> None:
        self.t0 = time.time()
        self.rows: list[tuple[float, str, str]] = []

    def add(self, at: float, where: str, what: str) -> None:
        """Record one event."""
        self.rows.append((at, where, what))

    def print(self) -> None:
        """Print every event in order."""
        for at, where, what in sorted(self.rows, key=lambda r: r[0]):
            print(f"  {at - self.t0:+8.3f}s  {where:<14} {what}")


async def read_plugs(stack: Stack) -> dict[str, dict[str, bool | None]]:
    """Each home's plug states, read over Modbus TCP from the simulated relay boards (what is really switched)."""
    out: dict[str, dict[str, bool | None]] = {}
    async with BusPool() as pool:
        for h in stack.homes:
            states: dict[str, bool | None] = {}
            for p in PLUGS:
                dev = build_device(DeviceConfig(name=p["name"], driver="modbus_relay", transport="modbus-tcp",
                                                host=stack.host, port=h.relay_port, unit_id=1, coil=p["coil"]), pool)
                try:
                    states[p["name"]] = bool((await dev.read())["on"])
                except DeviceError:
                    states[p["name"]] = None
            out[h.gateway_id] = states
    return out


def transport_note(stack: Stack) -> str:
    """One line saying how the stack's parties talk: TLS with its CA, or plain on loopback."""
    if stack.pki is not None:
        return (f"TLS everywhere: every broker listens with TLS only, the hub serves HTTPS; everything verifies "
                f"with the CA {stack.pki.ca_file}")
    return (f"plain MQTT and HTTP on {stack.host}: use --tls for TLS on every broker, HTTPS on the hub and "
            "certificate verification everywhere (the production configuration)")


async def demo(state_dir: Path, retailers: int, homes: int, tls: bool = False, bridge_partitions: int = 1) -> int:
    """Start a stack, announce an emergency to every home, follow it to the plugs, print the timeline."""
    stack = Stack(state_dir, retailers=retailers, homes=homes, log_level="WARNING", tls=tls,
                  bridge_partitions=bridge_partitions)
    print(f"mhp-stack demo: starting {retailers} retailers and {homes} homes in {stack.dir}")
    t_start = time.monotonic()
    try:
        await stack.start()
        procs = stack.info["processes"]
        print(f"stack up in {time.monotonic() - t_start:.1f} s: {len(procs)} processes "
              f"({', '.join(sorted(procs))}); hub at {stack.hub_url}; see {stack.dir / 'stack.json'}")
        print(f"the DSO's console (platform, requests live, feeder plots, clients): {stack.console_url}")
        print(transport_note(stack))
        return await _scenario(stack)
    except StackError as exc:
        print(f"mhp-stack demo: {exc}", file=sys.stderr)
        return 1
    finally:
        await stack.stop()


async def _follow(http: httpx.AsyncClient, headers: dict[str, str], request_id: str, timeout_s: float
                  ) -> dict[str, Any]:
    """Poll a request until it ends (or the timeout)."""
    req: dict[str, Any] = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        req = (await http.get(f"/v1/requests/{request_id}", headers=headers)).json()
        if req["state"] in TERMINAL:
            break
        await asyncio.sleep(0.1)
    return req


def _client_rows(tl: Timeline, req: dict[str, Any]) -> None:
    for cid, c in sorted(req["clients"].items()):
        d = c["detail"]
        if c["state"] == "executed":
            what = (f"{cid} executed: shed {', '.join(d.get('shed', [])) or 'nothing'}; "
                    f"{d.get('measured_kw_before')} kW measured → {d.get('expected_kw')} kW expected")
        else:
            what = f"{cid} {c['state']}" + (f" ({d['reason']})" if "reason" in d else "")
            if "available_kw" in c:
                what += f", {c['available_kw']} kW available"
        tl.add(datetime.fromisoformat(c["updated_at"]).timestamp(), f"hub←{c['retailer_id']}", what)


# Complexity (PLR0915): the demo's scripted scenario, printed step by step.
async def _scenario(stack: Stack) -> int:  # noqa: PLR0915
    tl = Timeline()
    dso = {"Authorization": f"Bearer {stack.tokens['dso']}"}
    clients = [h.client_id for h in stack.homes]
    ok = True
    async with stack.http_client() as http:
        # 1. A network tariff calendar, broadcast to every retailer and on to every gateway.
        print("\nscenario 1/3: the DSO publishes a network tariff calendar")
        day = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        periods = [{"start": (day + timedelta(hours=h)).isoformat(), "end": (day + timedelta(hours=h + 1)).isoformat(),
                    "price_eur_per_kwh": 0.08 if h < 7 or h >= 22 else 0.21} for h in range(24)]
        t = time.time()
        r = await http.post("/v1/tariffs", headers=dso, json={
            "tariff_id": "tou-demo", "valid_from": day.isoformat(), "valid_to": (day + timedelta(days=1)).isoformat(),
            "periods": periods})
        tl.add(t, "dso", f"POST /v1/tariffs → {r.status_code}, version {r.json().get('version')}")
        req = await _follow(http, dso, r.json()["request_id"], 10)
        for rid, v in sorted(req["retailers"].items()):
            tl.add(datetime.fromisoformat(v["updated_at"]).timestamp(), f"hub←{rid}", f"tariff {v['state']}")
        for broker, (tid, version, seen) in sorted(stack.tariffs.items()):
            if broker != "hub":
                tl.add(seen, f"broker {broker}", f"holds tariff {tid} v{version} retained for its gateways")
        ok = ok and req.get("state") == "completed"
        # 2. A two-phase load reduction: availability first, then disconnects until the reduction is covered.
        print("scenario 2/3: the DSO asks for an 8 kW load reduction (availability within 2 s, then disconnects)")
        await asyncio.sleep(0.5)
        t = time.time()
        r = await http.post("/v1/load-reductions", headers=dso, json={
            "client_ids": clients, "reduction_kw": 8.0, "start": (datetime.now(UTC) + timedelta(seconds=3)).isoformat(),
            "duration_s": 60, "respond_within_s": 2})
        tl.add(t, "dso", f"POST /v1/load-reductions 8 kW → {r.status_code}")
        req = await _follow(http, dso, r.json()["request_id"], 15)
        sel = req.get("selection", {})
        tl.add(datetime.fromisoformat(req["created_at"]).timestamp() + 2, "hub",
               f"availability closed: chose {', '.join(sel.get('chosen', []))} ({sel.get('selected_kw')} kW)")
        _client_rows(tl, req)
        tl.add(datetime.fromisoformat(req["completed_at"] or req["created_at"]).timestamp(), "hub",
               f"load reduction {req['state']}")
        ok = ok and req.get("state") == "completed"
        # 3. An emergency announced ahead of time to every home.
        lead_s, limit_kw = 2.0, 1.0
        print(f"scenario 3/3: the DSO announces an emergency to every home, {lead_s:.0f} s ahead: "
              f"hold import under {limit_kw} kW")
        start = datetime.now(UTC) + timedelta(seconds=lead_s)
        body = {"client_ids": clients, "start": start.isoformat(), "duration_s": 30, "power_limit_kw": limit_kw}
        t = time.time()
        r = await http.post("/v1/emergencies", json=body, headers={**dso, "Idempotency-Key": "demo-emergency-1"})
        tl.add(t, "dso", f"POST /v1/emergencies for {len(clients)} clients → {r.status_code}")
        if r.status_code != 202:
            print(f"the hub answered {r.status_code}: {r.text}", file=sys.stderr)
            return 1
        request_id = r.json()["request_id"]
        bad = await http.post("/v1/emergencies", headers=dso,
                              json={**body, "client_ids": ["client-9999"], "power_limit_kw": -1})
        tl.add(time.time(), "hub", f"a malformed emergency is refused: {bad.status_code} {bad.json()['message'][:60]}")
        req = await _follow(http, dso, request_id, lead_s + 30)
    created = datetime.fromisoformat(req["created_at"]).timestamp()
    tl.add(created, "hub", f"emergency stored ({req['trace']['storage_ms']:.1f} ms in storage), answered 202")
    if "dispatch_ms" in req["trace"]:
        per = ", ".join(f"{rid} ({v['clients']} clients)" for rid, v in sorted(req["retailers"].items()))
        tl.add(created + req["trace"]["dispatch_ms"] / 1000, "hub", f"dispatched to {per}")
    tl.add(start.timestamp(), "-", "emergency takes effect")
    _client_rows(tl, req)
    if req.get("completed_at"):
        tl.add(datetime.fromisoformat(req["completed_at"]).timestamp(), "hub", f"emergency {req['state']}")
    events = Path(stack.info["device_events"])
    if events.exists():
        for line in events.read_text().splitlines():
            e = json.loads(line)
            if e["at"] >= tl.t0:
                tl.add(e["at"], f"plug {e['gateway_id']}",
                       f"{e['plug']} switched {'ON' if e['on'] else 'OFF'} (home now draws {e['home_kw']} kW)")
    print("\ntimeline (seconds from the first POST):")
    tl.print()
    print("\nemergency trace (ms): " + ", ".join(f"{k}={v}" for k, v in req.get("trace", {}).items()))
    plugs = await read_plugs(stack)
    print("\nplug states read back over Modbus TCP from every home's relay board:")
    sheddable = [p["name"] for p in PLUGS if p["sheddable"]]
    ok = ok and req.get("state") == "completed"
    for gw, states in plugs.items():
        shown = "  ".join(f"{n}={'on' if v else 'OFF' if v is False else '?'}" for n, v in states.items())
        print(f"  {gw:<8} {shown}")
        ok = ok and all(states[n] is False for n in sheddable)
    print(f"\nemergency {request_id}: {req.get('state')}; "
          f"{sum(1 for c in req.get('clients', {}).values() if c['state'] == 'executed')}/{len(clients)} executed")
    if stack.sup.events:
        print("supervisor: " + "; ".join(stack.sup.events))
    print("demo " + ("succeeded" if ok else "FAILED"))
    return 0 if ok else 1


async def up(state_dir: Path, retailers: int, homes: int, tls: bool = False, bridge_partitions: int = 1) -> int:
    """Start a stack and keep it running (restarting what dies) until interrupted."""
    stack = Stack(state_dir, retailers=retailers, homes=homes, tls=tls, bridge_partitions=bridge_partitions)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stack.start()
        print(json.dumps({"stack_json": str(stack.dir / "stack.json"), "hub_url": stack.hub_url,
                          "console_url": stack.console_url, "dso_web_url": stack.console_url,
                          "processes": stack.info["processes"], "tls": stack.info.get("tls")}), flush=True)
        print(f"mhp-stack: the DSO's console: {stack.console_url}", flush=True)
        print(f"mhp-stack: {transport_note(stack)}", flush=True)
        print(f"mhp-stack: up; {len(stack.homes)} homes, {len(stack.retailer_ids)} retailers. "
              f"Details in {stack.dir / 'stack.json'}. Ctrl-C stops.", flush=True)
        sup = asyncio.create_task(stack.supervise())
        await stop.wait()
        sup.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sup
        return 0
    except StackError as exc:
        print(f"mhp-stack: {exc}", file=sys.stderr)
        return 1
    finally:
        await stack.stop()


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mhp-stack``."""
    parser = argparse.ArgumentParser(prog="mhp-stack", description="The whole Market Hub Platform on one machine.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("demo", "run a scripted scenario on a fresh stack and print what happened where"),
                       ("up", "start the stack and keep it running; writes STATE_DIR/stack.json")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--state-dir", type=Path, default=None)
        p.add_argument("--retailers", type=int, default=2)
        p.add_argument("--homes", type=int, default=4)
        p.add_argument("--tls", action="store_true",
                       help="TLS on every broker and HTTPS on the hub, with a CA made in STATE_DIR/tls")
        p.add_argument("--bridge-partitions", type=int, default=1, metavar="K",
                       help="run each retailer's bridge as K processes partitioned by gateway (default 1)")
    args = parser.parse_args(argv)
    if not 1 <= args.bridge_partitions <= MAX_PARTITIONS:
        parser.error(f"--bridge-partitions must be between 1 and {MAX_PARTITIONS}")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    state_dir = args.state_dir
    if args.command == "demo":
        with tempfile.TemporaryDirectory(prefix="mhp-demo-") as tmp:
            return asyncio.run(demo(state_dir or Path(tmp), args.retailers, args.homes, args.tls,
                                    args.bridge_partitions))
    return asyncio.run(up(state_dir or Path("state"), args.retailers, args.homes, args.tls, args.bridge_partitions))


if __name__ == "__main__":
    sys.exit(main())
