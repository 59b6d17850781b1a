"""A gateway's device names are bounded where its configuration is loaded (``GatewayConfig``): at most
``MAX_DEVICES`` devices, each named by 1 to 64 ASCII letters, digits, ``.``, ``_`` or ``-``, with a clear error
naming the refused ones. The names go into every telemetry report; before, a name of any length or character (a
1 MB name, a newline, a quote) and any number of devices were accepted, so a report could exceed the brokers'
packet. The largest report the bounds allow is built and fits ``SEND_PAYLOAD_BYTES`` with room to spare."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from hems_firmware import config
from hems_firmware.config import ConfigError, GatewayConfig
from mhp_wire.messages import SEND_PAYLOAD_BYTES, FailsafeReport, Telemetry, encode

HEAD = '[gateway]\nid = "gw-1"\nclient_id = "c1"\n'


def _relay(name: str, coil: int = 0) -> str:
    return (f'\n[[devices]]\nname = {name}\ndriver = "modbus_relay"\ntransport = "modbus-tcp"\nhost = "127.0.0.1"\n'
            f'port = 502\ncoil = {coil}\n')


def _load(tmp_path: Path, devices: str) -> GatewayConfig:
    path = tmp_path / "gateway.toml"
    path.write_text(HEAD + devices)
    return GatewayConfig.load(path)


@pytest.mark.parametrize("name", [
    '"' + "x" * 65 + '"',        # one character too long
    '"x' + "y" * 1_000_000 + '"',  # a megabyte
    '"water heater"',            # a space
    '"boiler\\n"',               # a control character
    '"plug/1"',                  # a topic separator
    '"chauffe-eau-\u00e9"',      # not ASCII
    '"-plug"',                   # not starting with a letter or digit
    '"a\\"b"',                   # a quote
])
def test_a_device_name_out_of_bounds_is_refused_with_a_clear_error(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, _relay(name))
    text = str(err.value)
    assert "device names must be 1 to 64 characters: ASCII letters, digits, '.', '_' or '-'" in text
    assert len(text) < 500, "the error quotes at most the start of a long name"


def test_names_within_bounds_load(tmp_path: Path) -> None:
    names = ["meter", "water-heater", "Plug_1.2", "9" * 64]
    cfg = _load(tmp_path, "".join(_relay(f'"{n}"', i) for i, n in enumerate(names)))
    assert [d.name for d in cfg.devices] == names


def test_more_devices_than_the_bound_are_refused(tmp_path: Path) -> None:
    n = config.MAX_DEVICES
    assert _load(tmp_path, "".join(_relay(f'"plug-{i}"', i) for i in range(n))).devices[-1].name == f"plug-{n - 1}"
    with pytest.raises(ConfigError, match="devices: List should have at most 64 items"):
        _load(tmp_path, "".join(_relay(f'"plug-{i}"', i) for i in range(n + 1)))


READINGS = ["active_power_kw", "import_energy_kwh", "export_energy_kwh", "voltage_v", "current_a", "frequency_hz",
            "contracted_power_kva", "tariff_period", "breaker_state", "limiter_kw", "on", "available"]
"""Every reading any driver gives (device_drivers: Eastron, E-Redes HAN, DSMR P1, the relay) and the daemon's own."""
LONGEST_FLOAT = -2.2250738585072014e-308


def test_the_largest_telemetry_the_bounds_allow_fits_the_packet() -> None:
    names = [f"{i:02d}" + "n" * (config.DEVICE_NAME_MAX_CHARS - 2) for i in range(config.MAX_DEVICES)]
    assert all(config.DEVICE_NAME.fullmatch(n) for n in names)
    at = datetime.now(UTC)
    msg = Telemetry(gateway_id="g" * 64, client_id="c" * 64, seq=2**63, at=at,
                    devices={n: dict.fromkeys(READINGS, LONGEST_FLOAT) for n in names},
                    active_power_kw=LONGEST_FLOAT, sheddable_kw=LONGEST_FLOAT, rated_sheddable_kw=LONGEST_FLOAT,
                    failsafe=FailsafeReport(state="ended", started_at=at, ended_at=at, ended_by="reconnected",
                                            limit_kw=9999.123456789, offline_s=1e300, shed=names))
    size = len(encode(msg))
    assert size <= SEND_PAYLOAD_BYTES // 2, f"{size} bytes: less than half the packet's room left for new readings"
