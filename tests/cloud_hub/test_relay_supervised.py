"""The hub's MQTT relay is supervised: when it fails (here, the hub broker refuses the hub's login) the HTTP API
keeps serving, ``/readyz`` says why the hub is not ready, the failure is logged and counted, and the relay is
started again until it succeeds: once the broker accepts the credentials, the hub becomes ready and sends what was
accepted meanwhile."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

import cloud_hub.app
from broker_config.render import Identity, generate_password
from mhp_wire import topics
from mhp_wire.messages import Request
from tests.broker_fixtures import MosquittoFactory
from tests.cloud_hub.test_replicas import metric
from tests.hub_fixtures import IN_FORCE_SINCE, start_hub
from tests.mqtt_party import Party, parties


async def test_a_refused_login_keeps_the_api_serving_and_the_relay_recovers(
        tmp_path: Path, mosquitto_factory: MosquittoFactory, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cloud_hub.app, "RELAY_RESTART_MAX_S", 1.0)  # restart attempts every second, not every 30
    broker = mosquitto_factory("hub", ["r1"], "hub")
    password = generate_password()  # not (yet) the broker's password for "hub"
    caplog.set_level(logging.INFO, logger="cloud_hub.app")
    server, task, tokens, url = await start_hub(tmp_path, broker, mqtt_password=password)
    try:
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            for _ in range(200):
                ready = await http.get("/readyz")
                if "refused" in ready.json()["checks"]["mqtt"]:
                    break
                await asyncio.sleep(0.05)
            assert ready.status_code == 503
            assert "MqttAuthError" in ready.json()["checks"]["mqtt"], ready.text
            assert (await http.get("/healthz")).status_code == 200
            assert metric((await http.get("/metrics")).text, "mhp_relay_restarts_total") >= 1
            assert "the MQTT relay failed: MqttAuthError" in caplog.text
            # The API keeps serving: a request accepted now is stored and sent once the relay is up.
            admin, dso = ({"Authorization": f"Bearer {tokens[p]}"} for p in ("admin", "dso"))
            assert (await http.put("/v1/retailers/r1", json={"name": "R1"}, headers=admin)).status_code in (200, 201)
            r = await http.put("/v1/clients/c1", headers=dso, json={
                "retailer_id": "r1", "contracted_power_kw": 5, "valid_from": IN_FORCE_SINCE})
            assert r.status_code in (200, 201), r.text
            start = datetime.now(UTC) + timedelta(seconds=30)
            accepted = await http.post("/v1/emergencies", headers=dso, json={
                "client_ids": ["c1"], "start": start.isoformat(), "duration_s": 60, "power_limit_kw": 1})
            assert accepted.status_code == 202, accepted.text
            # The operator provisions the hub's password on the broker (restarted with it).
            broker.process.spec.privileged = Identity("hub", password)
            broker.identities["hub"] = broker.process.spec.privileged
            await broker.process.restart_async()
            with parties(Party(broker, "r1", topics.down("retailers", "r1"))) as (r1,):
                for _ in range(200):
                    if (await http.get("/readyz")).status_code == 200:
                        break
                    await asyncio.sleep(0.1)
                assert (await http.get("/readyz")).json()["checks"]["mqtt"] == "ok"
                msg = await r1.next("request", timeout=10)  # behind the registration's customers announcement
                assert isinstance(msg, Request) and msg.request_id == accepted.json()["request_id"]
    finally:
        server.should_exit = True
        await task
