"""Hub decoding benchmark: a retailer's ``outcomes`` read by the models' :func:`~mhp_wire.messages.decode`
against the hand reader :func:`~mhp_wire.fastwire.read_outcomes`, down to the reports the hub's group commit takes
(``cloud_hub.relay._Reported.of``); and a single ``outcome`` and an ``ack``, decoded against the hand reading of
their plain shape (:func:`~mhp_wire.fastwire.read_report`, the bridge's reader of the same two types).

    python -m sim.bench_hub_decode [--reports 2000] [--repeat 20] [--runs 5] [--gc-tuned]

Each figure is the thread's CPU (``time.thread_time``) of ``--repeat`` reads of one payload (500 times as many for a
single ``outcome`` or a one-id ``ack``), per report or per id (µs), best and median of ``--runs``. The payloads
are the bridge's own (:func:`mhp_wire.fastwire.outcomes_payload`): ``delivered`` entries (no detail, one trace
entry) and ``executed`` entries (a gateway's detail of six values and three trace entries; at most 1,000, as the
bridge packs them: 2,000 are over the 256 KiB limit). Rows:

- ``decode``: :func:`mhp_wire.messages.decode` (what the hub did before the ninth round);
- ``read``: :func:`mhp_wire.fastwire.read_outcomes` (the light values the hub's handlers take);
- ``read+construct``: the reader, then the models built from its values with ``model_construct`` (the other way of
  handing the hub's handlers what they took before; measured to choose, not used);
- ``… +hub``: the same, and the hub's reports for its group commit built from it (``_Reported.of``);
- ``hub reader``: what the hub's inbound router now calls (``fastwire.reader(decode, read_outcomes)``): for an
  ``outcome`` or ``ack``, the cost of passing it on to ``decode``;
- ``read_report``: a single ``outcome`` or ``ack`` read by hand.

A checkout without the reader (``PYTHONPATH=<checkout>``) prints the ``decode`` rows only. ``--gc-tuned`` first
tunes the garbage collector as ``cloud-hub serve`` does (:func:`mhp_wire.gc_tuning.tune_for_throughput`): the
models allocate more objects per report, so an untuned collector charges them more.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

from mhp_wire.fastwire import Report, ack_payload, outcomes_payload, read_report, reader
from mhp_wire.messages import ClientState, Outcome, OutcomeReport, Outcomes, decode, encode

try:
    from mhp_wire.fastwire import read_outcomes
except ImportError:  # a checkout before the ninth round
    read_outcomes = None  # type: ignore[assignment]

try:
    from cloud_hub.relay import _Reported
except ImportError:
    _Reported = None  # type: ignore[assignment,misc]


def _executed(i: int) -> Report:
    detail = {"limit_kw": 1.5, "measured_kw_before": 3.2, "measured_kw": 1.1, "shed": ["heater", "ev"],
              "expected_kw": 1.2, "meter_available": True}
    return Report("req-bench", f"c{i:06d}", ClientState.EXECUTED, detail,
                  {"gateway_ms": 3.5, "gateway_rtt_ms": 12.25, "retailer_ms": 0.8}, 1)


def _delivered(i: int) -> Report:
    return Report("req-bench", f"c{i:06d}", ClientState.DELIVERED, {}, {"retailer_ms": 0.412}, 1)


def _constructed(fast: Any) -> Outcomes:
    """The models from the reader's values, unchecked (they were checked): the alternative to the light values."""
    return Outcomes.model_construct(msg_id=fast.msg_id, request_id=fast.request_id, reports=[
        OutcomeReport.model_construct(client_id=c, state=s, detail=d, trace=t, revision=r)
        for c, s, d, t, r in fast.reports])


def cpu_us(read: Callable[[bytes], Any], payload: bytes, repeat: int, per: int) -> float:
    """Thread CPU µs per item of ``repeat`` reads of ``payload`` holding ``per`` items."""
    t0 = time.thread_time()
    for _ in range(repeat):
        read(payload)
    return (time.thread_time() - t0) / repeat / per * 1e6


def main() -> None:
    """Print best / median µs per report of each way, for each payload."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--reports", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--gc-tuned", action="store_true")
    args = ap.parse_args()
    if args.gc_tuned:
        from mhp_wire.gc_tuning import tune_for_throughput

        tune_for_throughput()
    n = args.reports
    hub: Callable[[Any], Any] = (lambda m: m) if _Reported is None else (lambda m: _Reported.of("r1", m))
    many: dict[str, Callable[[bytes], Any]] = {"decode": decode, "decode+hub": lambda p: hub(decode(p))}
    one: dict[str, Callable[[bytes], Any]] = {"decode": decode}
    if read_outcomes is not None:
        many["read"] = read_outcomes
        many["read+hub"] = lambda p: hub(read_outcomes(p))
        many["read+construct"] = lambda p: _constructed(read_outcomes(p))
        many["read+construct+hub"] = lambda p: hub(_constructed(read_outcomes(p)))
        one["hub reader"] = reader(decode, read_outcomes)
    one["read_report"] = read_report
    e = min(n, 1000)  # 2,000 of them are over the 256 KiB limit: the bridge sends at most 1,000 per message
    detail, trace = _executed(1).detail, _executed(1).trace
    payloads = [
        (f"outcomes, {e} executed", outcomes_payload("req-bench", [_executed(i) for i in range(e)])[1], e, many),
        (f"outcomes, {n} delivered", outcomes_payload("req-bench", [_delivered(i) for i in range(n)])[1], n, many),
        ("outcome, executed", encode(Outcome(request_id="req-bench", client_id="c1", state=ClientState.EXECUTED,
                                             detail=detail, trace=trace)), 1, one),
        ("ack, 1 id", ack_payload(["m-1"]), 1, one),
        (f"ack, {n} ids", ack_payload([f"{i:024x}-{i:x}" for i in range(n)]), n, one),
    ]
    print(f"µs of thread CPU per report (per id of an ack), best / median of {args.runs} runs"
          f"{', collector tuned' if args.gc_tuned else ''}")
    for name, payload, per, ways in payloads:
        print(f"{name} ({len(payload):,} bytes):")
        for way, read in ways.items():
            repeat = args.repeat if per > 1 else args.repeat * 500
            runs = [cpu_us(read, payload, repeat, per) for _ in range(args.runs)]
            print(f"  {way:<20} {min(runs):7.3f} / {statistics.median(runs):7.3f}")


if __name__ == "__main__":
    main()
