"""The MQTT writes benchmark runs both ways against a real Mosquitto (its figures are not judged here: speed is
measured by running it, docs/performance.md)."""

from __future__ import annotations

from sim.bench_mqtt_writes import one_run


async def test_the_writes_benchmark_publishes_both_ways() -> None:
    cpu, wall, writes = await one_run(400, 200, coalesce=True)
    assert writes is not None and 0 < writes < 400  # the packets of a turn went out together
    cpu, wall, writes = await one_run(400, 200, coalesce=False)
    assert writes is None and cpu > 0 and wall > 0
