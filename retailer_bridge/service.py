"""Runs one bridge: its store, its link to the hub broker, its link to the retailer broker, its dispatcher."""

from __future__ import annotations

import contextlib
import logging

from mhp_wire import topics
from mhp_wire.mqtt import MqttEndpoint, MqttLink
from retailer_bridge.relay import BridgeRelay
from retailer_bridge.settings import BridgeSettings
from retailer_bridge.store import BridgeStore

log = logging.getLogger(__name__)


async def run_bridge(settings: BridgeSettings) -> None:
    """Run until cancelled."""
    store = BridgeStore(settings.db_path)
    await store.open()
    relay = BridgeRelay(settings.retailer_id, settings.customers, store,
                        gateway_ack_timeout_s=settings.gateway_ack_timeout_s)
    rid = settings.retailer_id
    hub = MqttLink(
        MqttEndpoint(settings.hub_mqtt_host, settings.hub_mqtt_port, rid, settings.hub_mqtt_password,
                     settings.hub_mqtt_tls_ca_file),
        client_id=f"bridge-{rid}", subscriptions=[topics.down("retailers", rid), topics.PUBLIC_ALL],
        handler=relay.on_hub_message, status_topic=topics.status("retailers", rid), connect_timeout_s=None,
    )
    local = MqttLink(
        MqttEndpoint(settings.local_mqtt_host, settings.local_mqtt_port, settings.local_mqtt_username,
                     settings.local_mqtt_password, settings.local_mqtt_tls_ca_file),
        client_id=f"bridge-{rid}-local", subscriptions=[topics.all_up("gateways")],
        handler=relay.on_local_message, status_topic=topics.PUBLIC_STATUS, connect_timeout_s=None,
    )
    try:
        async with contextlib.AsyncExitStack() as stack:
            relay.local = await stack.enter_async_context(local)
            relay.hub = await stack.enter_async_context(hub)
            log.info("bridge %s running with %d customers", rid, len(settings.customers))
            relay.kick()
            await relay.run()
    finally:
        await store.close()
