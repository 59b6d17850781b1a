"""Tests of device_drivers: drivers against simulated devices speaking real Modbus frames."""
