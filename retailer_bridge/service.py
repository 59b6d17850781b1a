"""Runs one bridge: its store, its link to the hub broker, its link to the retailer broker, its dispatcher."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Mapping

from pydantic import ValidationError

from mhp_wire import topics
from mhp_wire.ids import is_id
from mhp_wire.loopwatch import LoopWatch
from mhp_wire.mqtt import MqttEndpoint, MqttError, MqttLink
from mhp_wire.ratelimit import RateLimiter
from retailer_bridge.instance_lock import active_instance
from retailer_bridge.partition import Partition, PartitionGate, describe, foreign_filters, uplink_filters
from retailer_bridge.personal_area import PersonalArea
from retailer_bridge.relay import BridgeRelay
from retailer_bridge.settings import BridgeSettings
from retailer_bridge.store import BridgeStore
from retailer_bridge.telemetry import TelemetryExporter

log = logging.getLogger(__name__)

LOCAL_RECEIVE_MAXIMUM = 65_535
"""The receive window the bridge asks of its gateways' broker (MQTT 5's largest). The bridge acknowledges a
gateway's outcome (PUBACK) only after the batch it came in is committed, so with the broker's default window (its
``max_inflight_messages``, 1,000) the outcomes of a fan-out wait at the broker, 1,000 per commit, while the bridge's
re-send timers run: a gateway that answered in time could be sent its command again. The window costs the bridge only
the memory of the messages it has read and not yet committed (docs/decisions.md, "The bridge asks its broker for a
wide receive window")."""


class Bridge:
    """One retailer's bridge; ``relay`` holds its counters (received, rejected) and live gateway state."""

    def __init__(self, settings: BridgeSettings) -> None:
        self.settings = settings
        self.store = BridgeStore(settings.db_path)
        self.partition = Partition(settings.partition, settings.partitions)
        """This process's share of the retailer's gateways (all of them unless ``partitions`` > 1)."""
        self.relay = BridgeRelay(settings.retailer_id, self.partition.customers(settings.customers), self.store,
                                 gateway_ack_timeout_s=settings.gateway_ack_timeout_s,
                                 gateway_retry_s=settings.gateway_retry_s,
                                 measurement_interval_s=settings.measurement_interval_s,
                                 rated_sheddable_kw=settings.customer_sheddable_kw)
        self.relay.hub_outcome_batches = settings.hub_outcome_batches
        self.relay.gateway_rtt.max_s = settings.gateway_retry_max_s
        self.gate = PartitionGate(self.partition, settings.customers)
        """Cuts the hub's requests and billing deliveries, and the gateways' uplinks, to this partition's share."""
        self.gate.install(self.relay)
        self.relay.gateway_limiter = RateLimiter(settings.gateway_rate_limit_per_s, settings.gateway_rate_limit_burst)
        self.telemetry = TelemetryExporter.from_settings(settings)
        self.relay.telemetry_sinks.append(self.telemetry.submit)
        self.relay.billing_sinks.append(self.telemetry.submit_billing)
        self.personal_area: PersonalArea | None = None
        """The customers' personal area while it runs (``personal_area.address``: where it listens)."""
        self._reload: asyncio.Task[None] | None = None
        self._local_link: MqttLink | None = None
        """The link to the retailer broker, from the moment it is made (:meth:`update_installations` changes its
        filters whether it is connected yet or not)."""
        part = f" p{settings.partition}" if settings.partitions > 1 else ""  # two partitions may share one loop
        self.loop_watch = LoopWatch(settings.loop_stall_s, name=f"bridge {settings.retailer_id}{part}")
        """The event loop's stall watchdog while the bridge runs (its ``stalls`` and ``stalled_s`` count them)."""

    async def update_installations(self, customers: Mapping[str, str],
                                   sheddable_kw: Mapping[str, float] | None = None) -> tuple[list[str], list[str]]:
        """Take a new installation record (``client_id -> gateway_id``, the whole retailer's) while running: this
        process's share replaces the relay's record (and ``sheddable_kw``, when given, its rated powers), and a
        partition subscribes at the retailer broker to the uplinks of the gateways it gained, then unsubscribes
        those it lost (an unpartitioned bridge's one filter already covers every gateway). Returns the gateways
        this process gained and lost."""
        before = set(self.partition.customers(self.gate.gateway_of).values())
        mine = self.partition.customers(customers)
        self.gate.gateway_of.clear()
        self.gate.gateway_of.update(customers)
        record = self.relay.customers  # the relay's aliases of its record are this one dict: changed in place
        record.clear()
        record.update(mine)
        if sheddable_kw is not None:
            self.relay.rated_sheddable_kw = dict(sheddable_kw)
        added, removed = sorted(set(mine.values()) - before), sorted(before - set(mine.values()))
        # The link as soon as it exists, connected or not (a change made while it connects or is down is sent
        # when it is up); before that, _run subscribes from the record.
        local = self._local_link
        if not self.partition.whole and local is not None:
            try:
                await local.subscribe([topics.party_up("gateways", g) for g in added])
            finally:  # the lost gateways' filters go (or wait for the connection) even if the subscribe failed
                await local.unsubscribe([topics.party_up("gateways", g) for g in removed])
        log.info("bridge %s: installation record updated (%s): %d gateways added, %d removed",
                 self.settings.retailer_id, describe(self.partition, customers), len(added), len(removed))
        return added, removed

    def reload_soon(self, load: Callable[[], BridgeSettings]) -> asyncio.Task[None] | None:
        """Re-read the installation record with ``load`` (on SIGHUP) and apply it (:meth:`update_installations`) in
        a task, returned (None while an earlier reload is still under way); settings that cannot be read leave the
        bridge serving the record it has, with the error in the log."""
        if self._reload is not None and not self._reload.done():
            log.warning("an installation record reload is still under way; send SIGHUP again once it is done")
            return None
        self._reload = asyncio.get_running_loop().create_task(self._reload_from(load), name="bridge-reload")
        return self._reload

    async def _reload_from(self, load: Callable[[], BridgeSettings]) -> None:
        try:
            settings = load()
        except (ValidationError, ValueError, OSError) as exc:
            log.error("the installation record was not reloaded (the bridge keeps the one it has): %s", exc)
            return
        try:
            await self.update_installations(settings.customers, settings.customer_sheddable_kw)
        except MqttError as exc:
            log.warning("installation record reloaded; its subscription changes wait for the broker: %s", exc)

    async def run(self) -> None:
        """Run until cancelled; with ``instance_lock_path``, first wait (as a standby) until this process holds it."""
        if self.settings.instance_lock_path is None:
            await self._run()
            return
        async with active_instance(self.settings.instance_lock_path):
            await self._run()

    async def _run(self) -> None:
        with self.loop_watch:
            await self._serve()

    async def _serve(self) -> None:
        s, rid = self.settings, self.settings.retailer_id
        # Our read marker (``ReadHorizon``): re-sends to gateways wait until we have read what they may have answered.
        # A login that cannot be a topic level gets none, and its re-sends are judged by the clock alone, as before.
        probe = [topics.bridge_probe(s.local_mqtt_username)] if is_id(s.local_mqtt_username) else []
        if not probe:
            log.warning("bridge %s: local login %r cannot name a read-marker topic; re-sends are judged by the clock "
                        "alone", rid, s.local_mqtt_username)
        self.relay.probe_topic = probe[0] if probe else None
        await self.store.open()
        await self.relay.load_customers()  # the hub's announcements survive a restart: before any message is read
        hub = MqttLink(
            MqttEndpoint(s.hub_mqtt_host, s.hub_mqtt_port, s.hub_mqtt_username or rid, s.hub_mqtt_password,
                         s.hub_mqtt_tls_ca_file),
            client_id=s.hub_mqtt_username or rid, subscriptions=[topics.down("retailers", rid), topics.PUBLIC_ALL],
            handler=self.relay.on_hub_message, status_topic=topics.status("retailers", rid), connect_timeout_s=None,
        )
        local = MqttLink(
            MqttEndpoint(s.local_mqtt_host, s.local_mqtt_port, s.local_mqtt_username, s.local_mqtt_password,
                         s.local_mqtt_tls_ca_file),
            client_id=s.local_mqtt_username,
            subscriptions=[*uplink_filters(self.partition, self.gate.gateway_of), *probe],
            handler=self.relay.on_local_message, status_topic=topics.PUBLIC_STATUS, connect_timeout_s=None,
            on_connect=self.relay.local_connected, batch_handler=self.relay.on_local_batch,
            receive_maximum=LOCAL_RECEIVE_MAXIMUM,
        )
        self._local_link = local
        try:
            async with contextlib.AsyncExitStack() as stack:
                await stack.enter_async_context(self.telemetry)  # spools and drains until the bridge stops
                if s.personal_area_port is not None:  # before the links: customers may edit while a broker is down
                    self.personal_area = await stack.enter_async_context(
                        PersonalArea(s, self.relay, self.store).serving())
                self.relay.local = await stack.enter_async_context(local)
                try:  # a partition's session may hold filters of an earlier run that are not its own now
                    await self.relay.local.unsubscribe(foreign_filters(self.partition, self.gate.gateway_of))
                except MqttError as exc:  # sent again at the next connection; the gate drops what they bring
                    log.warning("bridge %s: %s", rid, exc)
                self.relay.hub = await stack.enter_async_context(hub)
                log.info("bridge %s running with %s", rid, describe(self.partition, s.customers))
                self.relay.kick()
                await self.relay.run()
        finally:
            if self._reload is not None:
                self._reload.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._reload
            await self.store.close()


async def run_bridge(settings: BridgeSettings, reload: Callable[[], BridgeSettings] | None = None) -> None:
    """Run one bridge until cancelled; with ``reload``, SIGHUP re-reads the installation record with it."""
    bridge = Bridge(settings)
    if reload is None:
        await bridge.run()
        return
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, bridge.reload_soon, reload)
    try:
        await bridge.run()
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
