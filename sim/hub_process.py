"""A hub process of its own for the benchmarks that measure it from outside (``sim.bench_feed``,
``sim.bench_hub_loop``): a hub broker rendered from ``broker_config/`` with retailer ``r1``, a token book with an
administrator and a DSO, and ``python -m cloud_hub.cli serve`` on a free port, stopped at the end."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

from broker_config.launcher import BrokerSpec, Identity, MosquittoProcess, die_with_parent, generate_password
from cloud_hub.tokens import TokenBook
from mhp_wire import topics
from mhp_wire.messages import ACK_QOS, Ack, Request, WireError, decode, encode
from mhp_wire.mqtt import MqttEndpoint, MqttLink
from mhp_wire.ports import free_port

R1_PASSWORD = "r1-pw"
"""Retailer ``r1``'s password at the hub broker (a benchmark's throwaway broker)."""


@dataclass(frozen=True)
class HubProcess:
    url: str
    pid: int
    broker: MosquittoProcess
    admin: str
    dso: str


@dataclass(frozen=True)
class HubBroker:
    broker: MosquittoProcess
    hub_password: str
    """The hub's own password at ``broker``."""
    tokens_file: Path
    admin: str
    dso: str


@contextlib.contextmanager
def hub_broker(tmp: Path) -> Iterator[HubBroker]:
    """What a benchmark's hub needs in ``tmp``: its broker (the hub and retailer ``r1`` on it) and a tokens file
    with an admin's and a DSO's token."""
    spec = BrokerSpec(kind="hub", port=free_port(), data_dir=tmp / "hub-broker",
                      privileged=Identity("hub", generate_password()), parties=[Identity("r1", R1_PASSWORD)])
    with MosquittoProcess(spec) as broker:
        book = TokenBook(tmp / "tokens.json")
        yield HubBroker(broker, spec.privileged.password, book.path, book.issue("admin"), book.issue("dso"))


@contextlib.contextmanager
def hub_process(tmp: Path, env: Mapping[str, str], module: Sequence[str] = ("cloud_hub.cli",)
                ) -> Iterator[HubProcess]:
    """The broker and the hub in ``tmp``; ``env``: the hub's settings beyond its ports, store and tokens (rate
    limits, say); ``module``: what ``python -m`` runs, given ``--log-level WARNING serve`` (``cloud-hub``'s own
    command line, or a benchmark's variant of it)."""
    with hub_broker(tmp) as b:
        port = free_port()
        hub_env = {**os.environ, "MHP_HUB_HTTP_PORT": str(port), "MHP_HUB_DB_PATH": str(tmp / "hub.db"),
                   "MHP_HUB_TOKENS_FILE": str(b.tokens_file), "MHP_HUB_MQTT_PORT": str(b.broker.port),
                   "MHP_HUB_MQTT_PASSWORD": b.hub_password, **env}
        hub = subprocess.Popen([sys.executable, "-m", *module, "--log-level", "WARNING", "serve"],
                               env=hub_env, preexec_fn=die_with_parent())
        try:
            yield HubProcess(f"http://127.0.0.1:{port}", hub.pid, b.broker, b.admin, b.dso)
        finally:
            hub.terminate()
            hub.wait()




async def wait_ready(http: httpx.AsyncClient, timeout_s: float = 30.0) -> None:
    """Poll ``/readyz`` until the hub answers 200; :class:`TimeoutError` after ``timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if (await http.get("/readyz")).status_code == 200:
                return
        await asyncio.sleep(0.05)
    raise TimeoutError("the hub did not become ready")


def retailer_r1(broker: MosquittoProcess, answer: Callable[[Request], list[bytes]] | None = None
                ) -> tuple[MqttLink, list[MqttLink]]:
    """Retailer ``r1`` of a benchmark: acknowledges every request message, then publishes what ``answer`` makes of
    it (encoded outcomes; nothing by default: the requests stay open). Returns the link, not entered, and a box
    to put the entered link in (the handler publishes through it)."""
    box: list[MqttLink] = []
    up = topics.up("retailers", "r1")

    async def on_message(topic: str, payload: bytes, retained: bool) -> None:
        try:
            msg = decode(payload)
        except WireError:
            return
        if not isinstance(msg, Request) or not box:
            return
        await box[0].publish(up, encode(Ack(ack_ids=[msg.msg_id])), qos=ACK_QOS)  # as the real parties ack
        for out in answer(msg) if answer is not None else []:
            await box[0].publish(up, out)

    link = MqttLink(MqttEndpoint(broker.host, broker.port, "r1", R1_PASSWORD), client_id="r1",
                    subscriptions=[topics.down("retailers", "r1")], handler=on_message, clean_start=True,
                    session_expiry_s=0)
    return link, box


REGISTER_PER_CALL = 5_000
"""Clients per ``PUT /v1/clients`` when a benchmark registers its clients."""


async def register_r1_clients(http: httpx.AsyncClient, admin: str, dso: str, n: int,
                              extra: Mapping[str, object] | None = None) -> list[str]:
    """Register retailer ``r1`` and ``n`` clients it supplies since yesterday (``c000000`` ...), ``extra`` fields
    in every client record; returns their ids."""
    r = await http.put("/v1/retailers/r1", json={"name": "R1"}, headers={"Authorization": f"Bearer {admin}"})
    r.raise_for_status()
    clients = [f"c{i:06d}" for i in range(n)]
    since = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    for k in range(0, n, REGISTER_PER_CALL):
        r = await http.put("/v1/clients", headers={"Authorization": f"Bearer {dso}"}, json={"clients": [
            {"client_id": cid, "retailer_id": "r1", "contracted_power_kw": 6.9, "valid_from": since, **(extra or {})}
            for cid in clients[k:k + REGISTER_PER_CALL]]})
        r.raise_for_status()
    return clients
