"""A real gateway with its live page, for the page, browser and watch tests: the ``rig`` of test_gateway.py (a real
Mosquitto, a simulated home over real Modbus TCP) plus ``web_port``, and a restart on the same port."""

from __future__ import annotations

import asyncio
import contextlib
import warnings
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from device_drivers.sim.home import Plug, SimulatedHome, split_device_entries
from device_drivers.sim.server import ModbusSimServer
from hems_firmware.config import GatewayConfig
from hems_firmware.daemon import Gateway
from hems_firmware.web import bound_address
from mhp_wire import topics
from mhp_wire.messages import Command, EmergencyParams, RequestKind
from tests.broker_fixtures import BrokerHandle
from tests.mqtt_party import Party
from tests.waiting import eventually


class WebRig:
    """One running gateway with ``web_port`` set; :meth:`restart` stops it and starts a new one on the same port."""

    def __init__(self, home: SimulatedHome, broker: BrokerHandle, cfg: GatewayConfig,
                 require_page: bool = True) -> None:
        self.require_page = require_page
        self.home = home
        self.broker = broker
        self.cfg = cfg
        self.gateway = Gateway(cfg)
        self._task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        """The page's real port."""
        addr = bound_address(self.gateway)
        assert addr is not None, "the page is not listening"
        return addr[1]

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Run the gateway until its uplink is up, it has polled and its page listens."""
        gw = self.gateway
        self._task = asyncio.create_task(gw.run(), name=f"test-{gw.id}")
        for _ in range(250):
            page_up = bound_address(gw) is not None or not self.require_page
            if gw.link is not None and gw.link.connected and gw.state and page_up:
                return
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.02)
        raise TimeoutError("the gateway did not come up")

    async def stop(self) -> None:
        """Cancel the gateway and wait until it has shut down.

        Python 3.11's ``asyncio.wait_for`` swallows a cancellation that arrives just as its inner wait completes;
        ``Gateway._outbox_loop`` waits with it, so now and then that task ignores the TaskGroup's cancellation and
        ``run()`` never ends (the TaskGroup does not cancel twice). Rather than hang, cancel the stuck task again,
        with a warning that pytest reports.
        """
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        for _ in range(3):
            done, _ = await asyncio.wait({task}, timeout=1.5)
            if done:
                break
            stuck = [t for t in asyncio.all_tasks() if t.get_name().startswith(f"gw-{self.gateway.id}-")
                     and t.cancelling() and not t.done()]
            warnings.warn(f"Gateway.run() did not end: {[t.get_name() for t in stuck]} ignored their cancellation "
                          "(asyncio.wait_for on Python 3.11); cancelling them again", RuntimeWarning, stacklevel=2)
            for t in stuck:
                t.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)

    async def restart(self) -> None:
        """Stop the gateway; start a new one with the same state directory, on the same port."""
        port = self.port
        await self.stop()
        self.cfg = self.cfg.model_copy(update={"gateway": self.cfg.gateway.model_copy(update={"web_port": port})})
        self.gateway = Gateway(self.cfg)
        await self.start()


@contextlib.asynccontextmanager
async def running_gateway(tmp_path: Path, broker: BrokerHandle, *, require_page: bool = True,
                          plug_names: tuple[str, str, str] = ("heater", "ev", "fridge"),
                          **gateway: Any) -> AsyncIterator[WebRig]:
    """A gateway ``gw-1`` of client ``c1`` with a meter and three plugs (heater 2 kW, ev 3.7 kW, both sheddable;
    fridge 0.15 kW), page on port 0; ``gateway`` overrides ``[gateway]`` settings."""
    heater, ev, fridge = plug_names
    home = SimulatedHome(0.3, [Plug(0, 2.0, heater, 1, True), Plug(1, 3.7, ev, 2, True),
                               Plug(3, 0.15, fridge, 9, False)])
    async with ModbusSimServer({1: home.meter}, port=0) as meter, ModbusSimServer({1: home.relays}, port=0) as relay:
        devices = split_device_entries(home, "127.0.0.1", meter.port, relay.port)
        cfg = GatewayConfig.model_validate({
            "gateway": {"id": "gw-1", "client_id": "c1", "state_dir": str(tmp_path / "gw"), "poll_interval_s": 0.2,
                        "telemetry_interval_s": 0.2, "web_port": 0,
                        "uplink": {"host": broker.host, "port": broker.port,
                                   "password": broker.identities["gw-1"].password}, **gateway},
            "devices": devices})
        rig = WebRig(home, broker, cfg, require_page)
        await rig.start()
        try:
            yield rig
        finally:
            await rig.stop()


def emergency(request_id: str, lead_s: float = 0.0, duration_s: float = 30, limit_kw: float = 1.0) -> Command:
    """An emergency for client ``c1``: hold the home under ``limit_kw`` (1 kW sheds the heater and the EV)."""
    start = datetime.now(UTC) + timedelta(seconds=lead_s)
    params = EmergencyParams(start=start, end=start + timedelta(seconds=duration_s), power_limit_kw=limit_kw)
    return Command(request_id=request_id, client_id="c1", kind=RequestKind.EMERGENCY, params=params,
                   expires_at=params.end)


async def send(rig: WebRig, bridge: Party, cmd: Command) -> None:
    """Publish ``cmd`` to the gateway as its retailer's bridge does, and wait until the gateway has stored it (what
    its ack says; an outcome ready within the gateway's ack hold stands for the ack, which then never comes)."""
    await bridge.publish(topics.down("gateways", "gw-1"), cmd)
    await eventually(lambda: rig.gateway.store.held_revision(cmd.request_id), f"the gateway stored {cmd.request_id}")
