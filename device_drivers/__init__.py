"""Device drivers of the home energy gateway: the only package that talks Modbus or serial.

Layers: pymodbus framing and transport, wrapped by :class:`ModbusBus` (one lock, gap and timeout per bus,
vendor errors mapped to ours), then device meaning (:mod:`.eastron`, :mod:`.eredes`, :mod:`.relay`); for P1
telegrams :mod:`.p1_framing` (pure), :mod:`.obis` (pure) and :mod:`.serial_line` (pyserial) under
:mod:`.dsmr`. All behind the :class:`Meter` and :class:`Switch` interfaces that :func:`build_device` returns.
"""

from .backoff import Backoff
from .config import DeviceConfig, DriverName, TransportName
from .dsmr import DsmrP1Meter, P1Reader
from .eastron import METER_READINGS, EastronMeter
from .eredes import EredesHanMeter, HanMap
from .errors import DeviceBackedOff, DeviceError, DeviceExceptionResponse, DeviceUnavailable
from .modbus import BusEndpoint, BusPool, ModbusBus
from .registry import Device, Meter, Switch, build_device, build_devices
from .relay import ModbusRelay

__all__ = [
    "METER_READINGS",
    "Backoff",
    "BusEndpoint",
    "BusPool",
    "Device",
    "DeviceBackedOff",
    "DeviceConfig",
    "DeviceError",
    "DeviceExceptionResponse",
    "DeviceUnavailable",
    "DriverName",
    "DsmrP1Meter",
    "EastronMeter",
    "EredesHanMeter",
    "HanMap",
    "Meter",
    "ModbusBus",
    "ModbusRelay",
    "P1Reader",
    "Switch",
    "TransportName",
    "build_device",
    "build_devices",
]
