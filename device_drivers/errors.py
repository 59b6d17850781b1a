"""Errors raised by device drivers; vendor (pymodbus, pyserial) errors are mapped to these at the boundary."""

from __future__ import annotations


class DeviceError(Exception):
    """A device could not be read or commanded."""


class DeviceUnavailable(DeviceError):
    """The device did not answer: timeout, connection refused, port missing, or backed off."""


class DeviceBackedOff(DeviceUnavailable):
    """The device failed recently and is not asked again until its backoff expires."""

    def __init__(self, message: str, retry_in_s: float) -> None:
        """Carry how long until the device is tried again."""
        super().__init__(message)
        self.retry_in_s = retry_in_s


class DeviceExceptionResponse(DeviceError):
    """The device answered with a Modbus exception response."""

    #: Names of the standard Modbus exception codes.
    NAMES: dict[int, str] = {
        1: "illegal function",
        2: "illegal data address",
        3: "illegal data value",
        4: "server device failure",
        5: "acknowledge",
        6: "server device busy",
        8: "memory parity error",
        10: "gateway path unavailable",
        11: "gateway target device failed to respond",
    }

    def __init__(self, code: int, message: str = "") -> None:
        """Carry the Modbus exception `code`."""
        name = self.NAMES.get(code, "unknown exception")
        text = f"Modbus exception {code} ({name})"
        super().__init__(f"{message}: {text}" if message else text)
        self.code = code
