"""Relay driver against a simulated relay board over real Modbus TCP."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from device_drivers import BusPool, DeviceConfig, DeviceError, Switch, build_device
from device_drivers.sim import ModbusSimServer, RelayBoardSim

MakeCfg = Callable[..., DeviceConfig]


async def test_switch_writes_the_coil_and_returns_the_read_back_state(free_port: int, make_cfg: MakeCfg) -> None:
    changes: list[tuple[int, bool]] = []
    board = RelayBoardSim(8, on_change=lambda coil, on: changes.append((coil, on)))
    async with ModbusSimServer({2: board}, port=free_port), BusPool() as pool:
        plug = build_device(make_cfg(free_port, driver="modbus_relay", unit_id=2, coil=5), pool)
        assert isinstance(plug, Switch) and plug.kind == "switch"
        assert await plug.read() == {"on": False}
        assert await plug.set(True) is True
        assert board.states == [False] * 5 + [True] + [False] * 2
        assert await plug.read() == {"on": True}
        assert await plug.set(False) is False
        assert await plug.read() == {"on": False}
    assert changes == [(5, True), (5, False)]


async def test_relays_of_one_board_share_a_bus_and_keep_their_own_coil(free_port: int, make_cfg: MakeCfg) -> None:
    board = RelayBoardSim(4, initial=[True, False, True, False])
    async with ModbusSimServer({1: board}, port=free_port), BusPool() as pool:
        plugs = [build_device(make_cfg(free_port, f"p{c}", "modbus_relay", coil=c), pool) for c in range(4)]
        assert len(pool.buses) == 1
        assert [(await p.read())["on"] for p in plugs] == [True, False, True, False]
        assert isinstance(plugs[1], Switch)
        await plugs[1].set(True)
        assert board.states == [True, True, True, False]


async def test_a_coil_that_does_not_follow_the_write_is_an_error(free_port: int, make_cfg: MakeCfg) -> None:
    class StuckBoard(RelayBoardSim):
        """A board whose relay 0 is welded off: writes are acknowledged but change nothing."""

        def set_coil(self, coil: int, on: bool) -> None:
            pass

    async with ModbusSimServer({1: StuckBoard(8)}, port=free_port), BusPool() as pool:
        plug = build_device(make_cfg(free_port, driver="modbus_relay", coil=0), pool)
        assert isinstance(plug, Switch)
        with pytest.raises(DeviceError, match="wrote coil 0 on but it reads back off"):
            await plug.set(True)


async def test_a_coil_beyond_the_board_is_an_illegal_address(free_port: int, make_cfg: MakeCfg) -> None:
    async with ModbusSimServer({1: RelayBoardSim(8)}, port=free_port), BusPool() as pool:
        bus = pool.bus_for(make_cfg(free_port))
        with pytest.raises(DeviceError) as info:
            await bus.write_coil(1, 8, True)
        assert getattr(info.value, "code", None) == 2
        with pytest.raises(DeviceError) as info:
            await bus.read_coils(1, 40, 1)
        assert getattr(info.value, "code", None) == 2
        assert await bus.read_coils(1, 0, 8) == [False] * 8
