"""Simulated devices speaking their real wire protocols, for tests and the stack: Modbus devices through
pymodbus's server side (Eastron meters, relay boards, the E-Redes HAN port), and a DSMR P1 telegram writer on
a pty pair.

Start a simulated home on a TCP port::

    home = SimulatedHome(base_load_kw=0.4, plugs=[(0, 2.0), (1, 1.5)])
    async with ModbusSimServer(home.units, host="127.0.0.1", port=5020) as server:
        configs = home.device_configs("127.0.0.1", server.port)
"""

from .base import ModbusRequest, SimulatedDevice
from .clock import ManualClock
from .eredes import HanMeterSim, HanState
from .home import Plug, SimulatedHome
from .meter import MeterModel, MeterSim, MeterState
from .p1 import P1State, P1TelegramWriter, build_telegram
from .pty import PtyNullModem
from .relay import RelayBoardSim
from .server import ModbusSimServer, SimTransport

__all__ = [
    "HanMeterSim",
    "HanState",
    "ManualClock",
    "MeterModel",
    "MeterSim",
    "MeterState",
    "ModbusRequest",
    "ModbusSimServer",
    "P1State",
    "P1TelegramWriter",
    "Plug",
    "PtyNullModem",
    "RelayBoardSim",
    "SimTransport",
    "SimulatedDevice",
    "SimulatedHome",
    "build_telegram",
]
