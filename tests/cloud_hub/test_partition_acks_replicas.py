"""Two hub replicas (real ``cloud-hub serve`` processes, one SQLite file, one real Mosquitto) and a retailer whose
bridge is in two partitions: a partition's ``ack`` that reaches the replica not owning the message is forwarded
with its partition, and the owner keeps re-sending until both partitions have acknowledged (issue 14)."""

from __future__ import annotations

import asyncio

import httpx

from mhp_wire import topics
from tests.broker_fixtures import BrokerHandle
from tests.cloud_hub.test_partition_acks import ack, drain, resend_now
from tests.cloud_hub.test_replicas import (
    CLIENTS,
    Replica,
    cluster,  # noqa: F401  (the fixture, used by name below)
    emergency,
    metric,
    started,
)
from tests.mqtt_party import Party, parties

REQUESTS = 8
"""Enough requests that the broker's shared subscription hands some acks to each replica."""


async def resent(party: Party, within: float) -> set[str]:
    """The ``msg_id`` of every request received within ``within`` seconds."""
    got: set[str] = set()
    deadline = asyncio.get_running_loop().time() + within
    while (left := deadline - asyncio.get_running_loop().time()) > 0:
        try:
            got.add((await party.next("request", timeout=left)).msg_id)
        except TimeoutError:
            break
    return got


async def test_a_partitions_ack_forwarded_between_replicas_keeps_its_partition(
        cluster: tuple[Replica, Replica, BrokerHandle, dict[str, str]]) -> None:  # noqa: F811
    a, b, broker, tokens = await started(cluster)
    up = topics.up("retailers", "r1")
    with parties(Party(broker, "r1", topics.down("retailers", "r1"))) as (r1,):
        async with httpx.AsyncClient(base_url=a.url, timeout=10) as ha, \
                httpx.AsyncClient(base_url=b.url, timeout=10) as hb:
            for _ in range(REQUESTS):  # all owned by replica a, which sends them
                r = await ha.post("/v1/emergencies", headers={"Authorization": f"Bearer {tokens['dso']}"},
                                  json=emergency(CLIENTS))
                assert r.status_code == 202, r.text
            sent = await resent(r1, 3.0)
            assert len(sent) == REQUESTS
            for mid in sent:  # partition 0 of 2: landing on a, or on b which forwards it to a
                await r1.publish(up, ack(mid, (0, 2)))
            await drain(r1)
            await resend_now(r1)
            assert await resent(r1, 3.0) == sent, "every message is still held: partition 1 has not acked"
            for mid in sent:
                await r1.publish(up, ack(mid, (1, 2)))
            await drain(r1)
            await resend_now(r1)  # presence reaches both replicas (unshared): a holds nothing more for r1
            assert await resent(r1, 3.0) == set()
            mb = (await hb.get("/metrics")).text
    assert 'mhp_replica_forwarded_total{kind="ack"}' in mb and metric(mb, "mhp_replica_forwarded_total") > 0, \
        "some acks reached replica b and were forwarded"
