"""Simulated Modbus devices speaking real frames through pymodbus's server side, for tests and the stack.

Start a simulated home on a TCP port::

    home = SimulatedHome(base_load_kw=0.4, plugs=[(0, 2.0), (1, 1.5)])
    async with ModbusSimServer(home.units, host="127.0.0.1", port=5020) as server:
        configs = home.device_configs("127.0.0.1", server.port)
"""

from .base import SimulatedDevice
from .clock import ManualClock
from .home import Plug, SimulatedHome
from .meter import MeterModel, MeterSim, MeterState
from .pty import PtyNullModem
from .relay import RelayBoardSim
from .server import ModbusSimServer, SimTransport

__all__ = [
    "ManualClock",
    "MeterModel",
    "MeterSim",
    "MeterState",
    "ModbusSimServer",
    "Plug",
    "PtyNullModem",
    "RelayBoardSim",
    "SimTransport",
    "SimulatedDevice",
    "SimulatedHome",
]
