"""``python -m sim.bench_accept --mix`` runs the rate experiment's mix through the hub's ASGI application with a
real Mosquitto and real SQLite, and accounts for every call (its figures are not judged here: speed is measured by
running it, docs/performance.md, "Issue 14, sixth round: the hub's HTTP cost per request")."""

from __future__ import annotations

from sim.bench_accept import one_mix


async def test_the_mix_sends_every_type_with_its_get_and_splits_each_call() -> None:
    result = await one_mix("sqlite", 20, 8, 5, 4, None)
    per = result["per_endpoint"]
    assert {k: v["calls"] for k, v in per.items()} == {"emergency": 2, "load_reduction": 2, "load_shift": 2,
                                                        "billing": 2, "get": 8}
    for name, e in per.items():
        # the call's loop CPU is its three parts: the use case, the hub's HTTP layer and the in-process client
        assert abs(e["use_case_ms"] + e["hub_http_ms"] + e["client_ms"] - e["loop_cpu_ms"]) < 0.01, name
        assert e["use_case_ms"] > 0 and e["hub_http_ms"] > 0, name
    assert result["keyed"] is True
    assert result["per_request_ms"]["process_cpu_whole_run"] >= result["per_request_ms"]["use_cases"]
    unkeyed = await one_mix("sqlite", 20, 4, 5, 0, None, keyed=False)
    assert unkeyed["keyed"] is False and unkeyed["per_endpoint"]["get"]["calls"] == 4
