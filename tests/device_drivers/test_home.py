"""SimulatedHome: the meter follows the plugs the relay drivers switch, over real Modbus TCP."""

from __future__ import annotations

import pytest

from device_drivers import BusPool, Meter, Switch, build_devices
from device_drivers.sim import ManualClock, ModbusSimServer, Plug, SimulatedHome


async def test_meter_power_follows_the_switched_plugs(free_port: int) -> None:
    home = SimulatedHome(base_load_kw=0.5, plugs=[(0, 2.0), (3, 1.2)])
    assert home.coil_state(0) and home.coil_state(3)  # coils start on
    assert home.total_power_kw() == pytest.approx(3.7)
    async with ModbusSimServer(home.units, port=free_port) as server, BusPool() as pool:
        devices = build_devices(home.device_configs("127.0.0.1", server.port, timeout_s=0.5), pool)
        meter, heater, oven = devices
        assert isinstance(meter, Meter) and isinstance(heater, Switch) and isinstance(oven, Switch)
        assert [d.name for d in devices] == ["meter", "plug0", "plug3"]
        assert heater.config.rated_power_kw == 2.0 and heater.config.sheddable

        before = await meter.read()
        assert before["active_power_kw"] == pytest.approx(3.7, rel=1e-6)
        assert before["voltage_v"] == pytest.approx(230.0)
        assert before["current_a"] == pytest.approx(3700 / 3 / 230, rel=1e-6)
        assert before["frequency_hz"] == pytest.approx(50.0)

        assert await heater.set(False) is False
        assert not home.coil_state(0)
        assert home.total_power_kw() == pytest.approx(1.7)
        assert (await meter.read())["active_power_kw"] == pytest.approx(1.7, rel=1e-6)

        await oven.set(False)
        assert (await meter.read())["active_power_kw"] == pytest.approx(0.5, rel=1e-6)
        await heater.set(True)
        assert (await meter.read())["active_power_kw"] == pytest.approx(2.5, rel=1e-6)


def test_energy_integrates_power_over_time(clock: ManualClock) -> None:
    home = SimulatedHome(base_load_kw=1.0, plugs=[Plug(0, 2.0, name="heater")], clock=clock)
    clock.advance(1800)  # half an hour at 3 kW
    home.relays.set_coil(0, False)
    clock.advance(3600)  # an hour at 1 kW
    assert home.meter_state().import_kwh == pytest.approx(2.5)
    home.set_base_load_kw(-2.0)  # PV surplus exports
    clock.advance(900)
    state = home.meter_state()
    assert (state.import_kwh, state.export_kwh) == (pytest.approx(2.5), pytest.approx(0.5))
    assert state.total_power_w == pytest.approx(-2000.0)
    assert state.current_a[0] == pytest.approx(2000 / 3 / 230)


def test_home_refuses_bad_plugs() -> None:
    with pytest.raises(ValueError, match="two plugs on coil 1"):
        SimulatedHome(0.1, [(1, 1.0), (1, 2.0)])
    home = SimulatedHome(0.1, [(11, 1.0)])
    assert home.relays.n_coils == 12
