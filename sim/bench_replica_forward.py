"""One retailer ``outcomes`` batch forwarded between hub replicas and read by the owner, in this process: the framing
(``cloud_hub.replicas.outcome_frame`` then ``read_inbox``: a header line and the retailer's bytes) against the form
before it (the payload in a JSON string of a ``ReplicaMessage``, re-created here as the start commit wrote and read
it). Prints the time per batch (best of 5) and how many bytes the forwarded message has more than the retailer's.

    python -m sim.bench_replica_forward [--sizes 2000 250000]

The batch is what a bridge writes (``mhp_wire.fastwire.outcomes_payload``): three clients whose detail lists the
loads they shed, grown to each size; the JSON string escapes every quote of it.
"""

from __future__ import annotations

import argparse
import json
import timeit

from cloud_hub.replicas import ReplicaMessage, outcome_frame, read_inbox
from mhp_wire.fastwire import Report, outcomes_payload
from mhp_wire.messages import ClientState


def batch(size: int) -> bytes:
    """An ``outcomes`` payload of about ``size`` bytes (at most)."""
    def payload(n: int) -> bytes:
        return outcomes_payload("q-1", [Report("q-1", c, ClientState.EXECUTED, {
            "limit_kw": 1.0, "shed": [f"load-{i:05d}" for i in range(n)]}, {"retailer_ms": 1.5}, 1)
            for c in ("c1", "c2", "c3")])[1]
    per_load = len(payload(2)) - len(payload(1))
    return payload(max(1, (size - len(payload(1))) // per_load))


def wrapped(p: bytes) -> bytes:
    """The form before the framing: forward, then read."""
    data = ReplicaMessage(type="outcome", sender="b", retailer_id="r1", payload=p.decode()).model_dump_json(
        exclude_none=True).encode()
    msg = ReplicaMessage.model_validate(json.loads(data))
    assert msg.payload is not None
    return msg.payload.encode()


def framed(p: bytes) -> bytes:
    """The framing: forward, then read."""
    return read_inbox(outcome_frame("b", "r1", p))[1] or b""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2_000, 250_000])
    args = ap.parse_args()
    for size in args.sizes:
        p = batch(size)
        assert wrapped(p) == framed(p) == p
        n = max(20, 2_000_000 // len(p))
        for name, f, forwarded in (
                ("wrapped", wrapped, ReplicaMessage(type="outcome", sender="b", retailer_id="r1", payload=p.decode())
                 .model_dump_json(exclude_none=True).encode()),
                ("framed", framed, outcome_frame("b", "r1", p))):
            best = min(timeit.repeat(lambda f=f, p=p: f(p), number=n, repeat=5)) / n  # type: ignore[misc]
            print(f"{len(p)} B batch, {name}: {best * 1e6:.1f} us to forward and read; forwarded {len(forwarded)} B "
                  f"(+{len(forwarded) - len(p)}, {100 * (len(forwarded) - len(p)) / len(p):.1f} %)")


if __name__ == "__main__":
    main()
