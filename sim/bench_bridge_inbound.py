"""Bridge benchmark: one request to N gateways and their answers as raw payloads, through the relay's own code
from the hub's ``request`` to the outcomes queued for the hub, into a real SQLite store, without MQTT.

    python -m sim.bench_bridge_inbound 10000 [--gc-tuned]

Two phases, each timed in process CPU (``time.process_time``: the event loop and the SQLite thread), per gateway:

- ``request``: the hub's ``request`` payload decoded and handled (``on_hub_message``): one command per gateway
  built, encoded and stored;
- ``reports``: every gateway's ``ack`` and ``outcome`` as the bytes a gateway publishes, through the relay's
  inbound router (``on_local_message``: topic, rate limit, decode, handler) in waves of 500 gateways, as they
  arrive over MQTT, into one store write per batch and the outcomes packed for the hub.

The relay has no MQTT links, so nothing is published (neither the commands nor the answers to gateways). It uses
only entry points that older bridges have too, so it also runs against another checkout
(``PYTHONPATH=<checkout>``) for a before/after on the same machine. ``--gc-tuned`` first tunes the garbage
collector as the bridge's process does (:func:`mhp_wire.gc_tuning.tune_for_throughput`; a checkout without it
runs untuned).
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from mhp_wire import topics
from mhp_wire.messages import Ack, ClientState, EmergencyParams, Outcome, Request, RequestKind, decode, encode
from retailer_bridge.relay import BridgeRelay
from retailer_bridge.store import BridgeStore

WAVE = 500


async def bench(n: int) -> tuple[float, float]:
    """CPU ms per gateway of the two phases."""
    with tempfile.TemporaryDirectory() as d:
        store = BridgeStore(Path(d) / "b.db")
        await store.open()
        relay = BridgeRelay("r1", {f"c{i}": f"gw-{i}" for i in range(n)}, store)
        start = datetime.now(UTC) + timedelta(minutes=1)
        params = EmergencyParams(start=start, end=start + timedelta(minutes=5), power_limit_kw=1.0)
        req = Request(request_id="q", kind=RequestKind.EMERGENCY, client_ids=[f"c{i}" for i in range(n)],
                      params=params, expires_at=params.end)
        t0 = time.process_time()
        await relay.on_hub_message(topics.down("retailers", "r1"), encode(req), False)
        t1 = time.process_time()
        commands = await store.payloads_of("q")
        assert len(commands) == n, f"{len(commands)} commands stored for {n} clients"
        payloads = []
        for i in range(n):
            cmd = decode(commands[f"c{i}"])
            payloads.append((topics.up("gateways", f"gw-{i}"), encode(Ack(ack_ids=[cmd.msg_id])),
                             encode(Outcome(request_id="q", client_id=f"c{i}", state=ClientState.EXECUTED,
                                            trace={"gateway_ms": 0.3}))))
        t2 = time.process_time()
        for k in range(0, n, WAVE):
            await asyncio.gather(*(relay.on_local_message(topic, p, False)
                                   for topic, ack, out in payloads[k:k + WAVE] for p in (ack, out)))
        t3 = time.process_time()
        counts = await store.counts()
        assert counts.get("closed") == n, counts
        await store.close()
        return (t1 - t0) / n * 1000, (t3 - t2) / n * 1000


def main() -> None:
    """Run it once and print the figures."""
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    n = int(args[0]) if args else 10_000
    if "--gc-tuned" in sys.argv:
        try:
            from mhp_wire.gc_tuning import tune_for_throughput
        except ImportError:
            print("this checkout does not tune the garbage collector: untuned")
        else:
            tune_for_throughput()
    request_ms, reports_ms = asyncio.run(bench(n))
    print(f"{n} gateways: request {request_ms:.4f} ms CPU per gateway, reports {reports_ms:.4f} ms, "
          f"together {request_ms + reports_ms:.4f} ms")


if __name__ == "__main__":
    main()
