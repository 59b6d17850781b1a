"""The hub's own description (``/docs``, ``/redoc``, ``/openapi.json``) and ``/metrics`` are served only where the
settings say so: by default in development, not in production (its public listener), and as set when set; against
a real hub (uvicorn on a free port, real hub broker)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from cloud_hub.settings import HubSettings
from tests.broker_fixtures import MosquittoFactory
from tests.hub_fixtures import HubHandle, running_hub

DESCRIPTION = ("/docs", "/redoc", "/openapi.json")


def production(tmp_path: Path, **settings: Any) -> HubSettings:
    """Production settings as an operator writes them (a broker password, MQTT over TLS, HTTPS)."""
    return HubSettings(environment="production", mqtt_password="not-a-default",
                       mqtt_tls_ca_file=str(tmp_path / "ca.crt"), tls_certfile=tmp_path / "hub.crt",
                       tls_keyfile=tmp_path / "hub.key", **settings)


@pytest.mark.parametrize(("given", "docs", "metrics"), [
    ({}, False, False),
    ({"expose_docs": True}, True, False),
    ({"expose_metrics": True}, False, True),
    ({"expose_docs": True, "expose_metrics": True}, True, True),
])
def test_production_exposes_neither_unless_told(tmp_path: Path, given: dict[str, bool], docs: bool,
                                                metrics: bool) -> None:
    s = production(tmp_path, **given)
    assert (s.expose_docs, s.expose_metrics) == (docs, metrics)


@pytest.mark.parametrize(("given", "docs", "metrics"), [
    ({}, True, True),
    ({"expose_docs": False}, False, True),
    ({"expose_metrics": False}, True, False),
])
def test_development_exposes_both_unless_told(given: dict[str, bool], docs: bool, metrics: bool) -> None:
    s = HubSettings(**given)
    assert (s.expose_docs, s.expose_metrics) == (docs, metrics)


def test_the_environment_variables_set_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MHP_HUB_EXPOSE_DOCS", "false")
    monkeypatch.setenv("MHP_HUB_EXPOSE_METRICS", "false")
    assert (HubSettings().expose_docs, HubSettings().expose_metrics) == (False, False)


@pytest.fixture
async def closed_hub(request: pytest.FixtureRequest, tmp_path: Path, mosquitto_factory: MosquittoFactory
                     ) -> AsyncIterator[HubHandle]:
    """A hub that exposes neither (what production gets by default)."""
    async for h in running_hub(request, tmp_path, mosquitto_factory, "sqlite", expose_docs=False,
                               expose_metrics=False):
        yield h


async def test_a_hub_that_does_not_expose_them_answers_404_and_serves_the_api(closed_hub: HubHandle) -> None:
    http = closed_hub.http
    for path in (*DESCRIPTION, "/metrics"):
        r = await http.get(path)
        assert r.status_code == 404, (path, r.status_code)
    assert (await http.get("/healthz")).status_code == 200
    assert (await http.get("/readyz")).status_code == 200
    assert (await http.get("/v1/requests/q-1")).status_code == 401, "the API itself is unchanged"
    assert (await http.get("/v1/requests/q-1", headers=closed_hub.auth("dso"))).status_code == 404


async def test_a_development_hub_exposes_them(hub: HubHandle) -> None:
    for path in DESCRIPTION:
        assert (await hub.http.get(path)).status_code == 200, path
    assert (await hub.http.get("/openapi.json")).json()["info"]["title"] == "Market Hub Platform"
    metrics = await hub.http.get("/metrics")
    assert metrics.status_code == 200 and "mhp_" in metrics.text
