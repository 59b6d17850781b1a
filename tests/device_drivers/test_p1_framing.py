"""P1 telegram framing from raw byte vectors fed byte by byte: CRC, resync on garbage, bounded buffer."""

from __future__ import annotations

import random

import pytest

from device_drivers.p1_framing import MAX_TELEGRAM_BYTES, TelegramFramer, crc16
from device_drivers.sim.p1 import P1State, build_telegram, p1_crc16

# The DSMR 5 example telegram of dsmr_parser's test set (ndokter/dsmr_parser test/example_telegrams.py), with the
# CRC it carries (6EEE), which crc16 must reproduce.
DSMR5 = (
    b"/ISk5\\2MT382-1000\r\n"
    b"\r\n"
    b"1-3:0.2.8(50)\r\n"
    b"0-0:1.0.0(170102192002W)\r\n"
    b"0-0:96.1.1(4B384547303034303436333935353037)\r\n"
    b"1-0:1.8.1(000004.426*kWh)\r\n"
    b"1-0:1.8.2(000002.399*kWh)\r\n"
    b"1-0:2.8.1(000002.444*kWh)\r\n"
    b"1-0:2.8.2(000000.000*kWh)\r\n"
    b"0-0:96.14.0(0002)\r\n"
    b"1-0:1.7.0(00.244*kW)\r\n"
    b"1-0:2.7.0(00.000*kW)\r\n"
    b"0-0:96.7.21(00013)\r\n"
    b"0-0:96.7.9(00000)\r\n"
    b"1-0:99.97.0(0)(0-0:96.7.19)\r\n"
    b"1-0:32.32.0(00000)\r\n"
    b"1-0:52.32.0(00000)\r\n"
    b"1-0:72.32.0(00000)\r\n"
    b"1-0:32.36.0(00000)\r\n"
    b"1-0:52.36.0(00000)\r\n"
    b"1-0:72.36.0(00000)\r\n"
    b"0-0:96.13.0()\r\n"
    b"1-0:32.7.0(0230.0*V)\r\n"
    b"1-0:52.7.0(0230.0*V)\r\n"
    b"1-0:72.7.0(0229.0*V)\r\n"
    b"1-0:31.7.0(0.48*A)\r\n"
    b"1-0:51.7.0(0.44*A)\r\n"
    b"1-0:71.7.0(0.86*A)\r\n"
    b"1-0:21.7.0(00.070*kW)\r\n"
    b"1-0:41.7.0(00.032*kW)\r\n"
    b"1-0:61.7.0(00.142*kW)\r\n"
    b"1-0:22.7.0(00.000*kW)\r\n"
    b"1-0:42.7.0(00.000*kW)\r\n"
    b"1-0:62.7.0(00.000*kW)\r\n"
    b"0-1:24.1.0(003)\r\n"
    b"0-1:96.1.0(3232323241424344313233343536373839)\r\n"
    b"0-1:24.2.1(170102161005W)(00000.107*m3)\r\n"
    b"0-2:24.1.0(003)\r\n"
    b"0-2:96.1.0()\r\n"
    b"!6EEE\r\n"
)

# A Sagemcom T210-D telegram (same test set) with W and Wh units; its CRC is 7EF9.
SAGEMCOM = (
    b"/EST5\\253710000_A\r\n\r\n1-3:0.2.8(50)\r\n0-0:1.0.0(221006155014S)\r\n1-0:1.8.0(006545766*Wh)\r\n"
    b"1-0:1.8.1(005017120*Wh)\r\n1-0:1.8.2(001528646*Wh)\r\n1-0:1.7.0(000000286*W)\r\n1-0:2.8.0(000000058*Wh)\r\n"
    b"1-0:2.8.1(000000000*Wh)\r\n1-0:2.8.2(000000058*Wh)\r\n1-0:2.7.0(000000000*W)\r\n1-0:3.8.0(000000747*varh)\r\n"
    b"1-0:3.8.1(000000000*varh)\r\n1-0:3.8.2(000000747*varh)\r\n1-0:3.7.0(000000000*var)\r\n"
    b"1-0:4.8.0(003897726*varh)\r\n1-0:4.8.1(002692848*varh)\r\n1-0:4.8.2(001204878*varh)\r\n"
    b"1-0:4.7.0(000000166*var)\r\n!7EF9\r\n"
)

# A DSMR 3 telegram: no CRC after the "!".
DSMR3 = (
    b"/ISk5\\2MT382-1000\r\n\r\n0-0:96.1.1(4B384547303034303436333935353037)\r\n1-0:1.8.1(12345.678*kWh)\r\n"
    b"1-0:1.8.2(12345.678*kWh)\r\n1-0:2.8.1(12345.678*kWh)\r\n1-0:2.8.2(12345.678*kWh)\r\n0-0:96.14.0(0002)\r\n"
    b"1-0:1.7.0(001.19*kW)\r\n1-0:2.7.0(000.00*kW)\r\n0-0:17.0.0(016*A)\r\n0-0:96.3.10(1)\r\n!\r\n"
)


def feed_bytewise(framer: TelegramFramer, stream: bytes) -> list[bytes]:
    out: list[bytes] = []
    for i in range(len(stream)):
        out += framer.feed(stream[i : i + 1])
    return out


def with_crc(body: bytes) -> bytes:
    """Close a telegram body (``/`` .. ``!``) with its CRC and CR LF."""
    return body + b"%04X\r\n" % crc16(body)


@pytest.mark.parametrize(
    ("data", "crc"),
    [
        (b"123456789", 0xBB3D),  # the check value of CRC-16/ARC, the same polynomial, init and xorout
        (DSMR5[: DSMR5.index(b"!") + 1], 0x6EEE),
        (SAGEMCOM[: SAGEMCOM.index(b"!") + 1], 0x7EF9),
        (b"", 0x0000),
    ],
)
def test_crc16_matches_known_vectors_and_the_simulators_bitwise_one(data: bytes, crc: int) -> None:
    assert crc16(data) == crc
    assert p1_crc16(data) == crc


def test_the_dsmr5_example_fed_byte_by_byte_comes_out_whole() -> None:
    framer = TelegramFramer()
    assert feed_bytewise(framer, DSMR5) == [DSMR5]
    assert framer.stats.telegrams == 1
    assert framer.stats.discarded_bytes == 0
    assert framer.buffered == 0


def test_a_telegram_split_at_every_point_comes_out_once() -> None:
    for cut in range(1, len(DSMR5)):
        framer = TelegramFramer()
        assert framer.feed(DSMR5[:cut]) == []
        assert framer.feed(DSMR5[cut:]) == [DSMR5], cut


def test_garbage_before_between_and_after_telegrams_is_skipped() -> None:
    noise = b"\x00\xff\r\nE\xfe\x7f!0000\r\n"  # holds a "!" and a trailer, but no "/"
    framer = TelegramFramer()
    out = feed_bytewise(framer, noise + DSMR5 + noise + SAGEMCOM + noise)
    assert out == [DSMR5, SAGEMCOM]
    assert framer.stats.discarded_bytes == 3 * len(noise)
    assert framer.stats.bad_crc == framer.stats.truncated == 0


def test_garbage_inside_a_telegram_drops_it_for_its_crc() -> None:
    middle = len(DSMR5) // 2
    spoiled = DSMR5[:middle] + b"\x13\x37" + DSMR5[middle:]
    framer = TelegramFramer()
    assert feed_bytewise(framer, spoiled + DSMR5) == [DSMR5]
    assert framer.stats.bad_crc == 1


def test_a_bad_crc_is_dropped_and_counted() -> None:
    wrong = DSMR5.replace(b"!6EEE", b"!6EEF")
    flipped = DSMR5.replace(b"00.244*kW", b"00.245*kW")
    framer = TelegramFramer()
    assert feed_bytewise(framer, wrong + flipped + DSMR5) == [DSMR5]
    assert framer.stats.bad_crc == 2
    assert framer.stats.telegrams == 1


def test_a_telegram_cut_short_by_the_next_one_is_dropped() -> None:
    framer = TelegramFramer()
    assert feed_bytewise(framer, DSMR5[:300] + DSMR5) == [DSMR5]
    assert framer.stats.truncated == 1
    assert framer.stats.discarded_bytes == 300


@pytest.mark.parametrize(
    "trailer",
    [b"!6EE\r\n", b"!6EEG\r\n", b"!6EEE\n", b"!6EEE\r\r", b"!\r\n", b"!6EEE!"],
)
def test_a_broken_trailer_drops_the_telegram_and_resyncs(trailer: bytes) -> None:
    broken = DSMR5[: DSMR5.index(b"!")] + trailer
    framer = TelegramFramer()
    assert feed_bytewise(framer, broken + DSMR5) == [DSMR5]
    assert framer.stats.truncated == 1


def test_a_lowercase_crc_is_accepted() -> None:
    assert TelegramFramer().feed(DSMR5.replace(b"!6EEE", b"!6eee")) == [DSMR5.replace(b"!6EEE", b"!6eee")]


def test_telegrams_without_crc_only_when_asked() -> None:
    strict = TelegramFramer()
    assert feed_bytewise(strict, DSMR3) == []
    assert strict.stats.truncated == 1
    lenient = TelegramFramer(require_crc=False)
    assert feed_bytewise(lenient, DSMR3 + DSMR5) == [DSMR3, DSMR5]  # a CRC that is there is still checked
    assert feed_bytewise(lenient, DSMR5.replace(b"!6EEE", b"!6EEF")) == []
    assert lenient.stats.bad_crc == 1


def test_an_endless_stream_of_garbage_stays_bounded() -> None:
    rng = random.Random(1234)
    framer = TelegramFramer()
    alphabet = b"/!0123456789ABCDEF\r\n()*:.-kWh\x00\xff"
    fed = 0
    for _ in range(400):
        chunk = bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 4000)))
        framer.feed(chunk)
        fed += len(chunk)
        assert framer.buffered <= MAX_TELEGRAM_BYTES + 6
    # no "/" at all: nothing is kept
    framer.feed(b"x" * 1_000_000)
    assert framer.buffered == 0
    # one "/" and no end: kept only up to the limit, then dropped
    framer.feed(b"/" + b"y" * (3 * MAX_TELEGRAM_BYTES))
    assert framer.buffered <= MAX_TELEGRAM_BYTES + 6
    assert framer.stats.oversized >= 1
    # and a good telegram still comes through afterwards
    assert feed_bytewise(framer, b"\r\n" + DSMR5) == [DSMR5]


def test_a_bang_past_the_limit_does_not_lose_the_next_telegram() -> None:
    framer = TelegramFramer(max_bytes=64)
    long_one = with_crc(b"/" + b"z" * 100 + b"!")
    short = with_crc(b"/ok\r\n\r\n1-0:1.7.0(01.000*kW)\r\n!")
    assert feed_bytewise(framer, long_one + short) == [short]
    assert framer.stats.oversized == 1


def test_reset_forgets_a_half_received_telegram() -> None:
    framer = TelegramFramer()
    framer.feed(DSMR5[:100])
    framer.reset()
    assert framer.buffered == 0
    assert framer.stats.truncated == 1
    assert framer.feed(DSMR5[100:] + DSMR5) == [DSMR5]


def test_the_simulators_telegrams_frame() -> None:
    telegram = build_telegram(P1State(import_power_kw=1.5))
    assert feed_bytewise(TelegramFramer(), telegram) == [telegram]
