"""The publish benchmark runs every way against a real Mosquitto (its figures are not judged here: speed is
measured by running it, docs/performance.md "Issue 14, seventh round: the publish path")."""

from __future__ import annotations

from sim.bench_mqtt_publish import run


async def test_the_publish_benchmark_runs_each_way_at_each_qos_until_every_puback() -> None:
    rows = await run(400, 200, 1, bound=True)
    assert sorted((qos, way) for _, qos, way, _, _ in rows) == sorted(
        (qos, way) for qos in (0, 1) for way in ("gmqtt", "link", "bound"))
    assert all(calls > 0 and whole >= calls for _, _, _, calls, whole in rows)
