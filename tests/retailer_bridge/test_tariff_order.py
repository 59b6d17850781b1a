"""A bridge keeps the tariff the hub published last, whatever order the hub's deliveries arrive in: a re-send of an
older tariff (an offline bridge's queued delivery, re-sent after first sends) must not replace a newer one at the
bridge and on its gateways' retained topic. Real hub and retailer brokers, a real bridge; the hub is an MQTT party."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from mhp_wire import topics
from mhp_wire.messages import Tariff, TariffPeriod
from tests.mqtt_party import Party, parties
from tests.retailer_bridge.test_bridge import Rig, rig

__all__ = ["rig"]


def tariff(tariff_id: str, published: int | None, version: int = 1) -> Tariff:
    start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(days=1)
    return Tariff(tariff_id=tariff_id, version=version, valid_from=start, valid_to=start + timedelta(days=1),
                  periods=[TariffPeriod(start=start, end=start + timedelta(days=1), price_eur_per_kwh=0.2)],
                  published=published)


async def retained_tariff(rig: Rig) -> Tariff:
    with parties(Party(rig.local, "gw-2", topics.TARIFF)) as (gw2,):
        got = await gw2.raw()
        assert got.retain
        return Tariff.model_validate_json(got.payload)


async def test_a_late_resend_of_an_older_tariff_does_not_replace_the_newer(rig: Rig) -> None:
    newer, older = tariff("summer", published=2), tariff("winter", published=1)
    with parties(Party(rig.hub_broker, "hub", topics.all_up("retailers"))) as (hub,):
        for msg in (newer, older):  # the older one's delivery was re-sent after the newer one's first send
            await hub.publish(topics.down("retailers", "r1"), msg)
            assert (await hub.next("ack")).ack_ids == [msg.msg_id]  # type: ignore[union-attr]
    await asyncio.sleep(0.2)
    kept = await retained_tariff(rig)
    assert (kept.tariff_id, kept.published) == ("summer", 2)
    stored = await rig.bridge.store.current_tariff()
    assert stored is not None and Tariff.model_validate_json(stored).tariff_id == "summer"


async def test_without_a_publication_order_a_newer_version_still_wins(rig: Rig) -> None:
    """From a hub older than ``published``: the same tariff's higher version wins, another tariff replaces it."""
    with parties(Party(rig.hub_broker, "hub", topics.all_up("retailers"))) as (hub,):
        for msg in (tariff("tou", None, version=3), tariff("tou", None, version=2)):
            await hub.publish(topics.down("retailers", "r1"), msg)
            await hub.next("ack")
    await asyncio.sleep(0.2)
    kept = await retained_tariff(rig)
    assert (kept.tariff_id, kept.version) == ("tou", 3)
