"""Runs one bridge: its store, its link to the hub broker, its link to the retailer broker, its dispatcher."""

from __future__ import annotations

import contextlib
import logging

from mhp_wire import topics
from mhp_wire.mqtt import MqttEndpoint, MqttLink
from mhp_wire.ratelimit import RateLimiter
from retailer_bridge.instance_lock import active_instance
from retailer_bridge.partition import Partition, PartitionGate, describe
from retailer_bridge.personal_area import PersonalArea
from retailer_bridge.relay import BridgeRelay
from retailer_bridge.settings import BridgeSettings
from retailer_bridge.store import BridgeStore
from retailer_bridge.telemetry import TelemetryExporter

log = logging.getLogger(__name__)


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

    async def run(self) -> None:
        """Run until cancelled; with ``instance_lock_path``, first wait (as a standby) until this process holds it."""
        if self.settings.instance_lock_path is None:
            await self._run()
            return
        async with active_instance(self.settings.instance_lock_path):
            await self._run()

    async def _run(self) -> None:
        s, rid = self.settings, self.settings.retailer_id
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
            client_id=s.local_mqtt_username, subscriptions=[topics.all_up("gateways")],
            handler=self.relay.on_local_message, status_topic=topics.PUBLIC_STATUS, connect_timeout_s=None,
            on_connect=self.relay.local_connected,
        )
        try:
            async with contextlib.AsyncExitStack() as stack:
                await stack.enter_async_context(self.telemetry)  # spools and drains until the bridge stops
                if s.personal_area_port is not None:  # before the links: customers may edit while a broker is down
                    self.personal_area = await stack.enter_async_context(
                        PersonalArea(s, self.relay, self.store).serving())
                self.relay.local = await stack.enter_async_context(local)
                self.relay.hub = await stack.enter_async_context(hub)
                log.info("bridge %s running with %s", rid, describe(self.partition, s.customers))
                self.relay.kick()
                await self.relay.run()
        finally:
            await self.store.close()


async def run_bridge(settings: BridgeSettings) -> None:
    """Run one bridge until cancelled."""
    await Bridge(settings).run()
