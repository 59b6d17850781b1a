"""A load is stored as held off before it is switched off: a gateway that dies right after the coil write (a power
cut, a kill) brings the load back on restart instead of leaving it off for good.

The gateway here stops dead right after its first switch-off (the wrapped ``_switch`` never returns, as a process
that died there), then is cancelled; a new gateway on the same state directory must switch the load back on. Real
Modbus TCP devices (pymodbus servers), a real Mosquitto and the gateway's real SQLite store, as in
``test_failsafe.py``."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from tests.broker_fixtures import MosquittoFactory
from tests.hems_firmware.test_failsafe import AFTER_S, lose_the_bridge, restart_brings_the_heater_back, running


async def test_a_gateway_that_dies_right_after_switching_a_load_off_brings_it_back_after_the_restart(
        tmp_path: Path, mosquitto_factory: MosquittoFactory) -> None:
    async with running(tmp_path, mosquitto_factory) as rig:
        gw = rig.gateway
        switch, died = gw._switch, asyncio.Event()

        async def switch_then_die(name: str, on: bool, *args: Any) -> bool:
            done = await switch(name, on, *args)
            if not on:  # the coil is written; nothing after it runs, as in a process that died here
                died.set()
                await asyncio.Event().wait()
            return done

        gw._switch = switch_then_die  # type: ignore[method-assign]
        await lose_the_bridge(rig)
        rig.clock.now += AFTER_S  # the failsafe starts shedding
        await asyncio.wait_for(died.wait(), 10)
        assert not rig.home.coil_state(0), "the heater was switched off"
        cfg, broker, home = gw.cfg, rig.broker, rig.home
    await restart_brings_the_heater_back(cfg, broker, home)
