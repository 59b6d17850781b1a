"""DSMR P1 telegram framing: bytes in, complete telegrams with a valid CRC out. Pure: no I/O, no clock.

A telegram runs from ``/`` to ``!``, then four hex digits of CRC16 (most significant first) and CR LF. The
CRC (``reference/devices.md``): polynomial 0xA001 (x¹⁶+x¹⁵+x²+1, reflected), initial value 0, no final XOR,
over every byte from ``/`` to ``!`` inclusive.

Resynchronisation: bytes before a ``/`` are discarded; a ``/`` inside a telegram (no value of a telegram holds
one) means the telegram was cut short and a new one starts there; a ``!`` not followed by the trailer drops the
telegram. A telegram longer than ``max_bytes`` without its ``!`` is dropped, and nothing outside a telegram is
kept, so the buffer never holds more than ``max_bytes`` plus the trailer, whatever arrives. Every drop is
counted in :class:`FramerStats`.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Bytes a telegram may have up to its ``!``; DSMR 5 telegrams with several M-Bus devices stay under 3 KiB.
MAX_TELEGRAM_BYTES = 8192

_HEX = frozenset(b"0123456789ABCDEFabcdef")
_START, _END = ord("/"), ord("!")
_TRAILER = 6  # four hex digits, CR, LF


def _crc_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC_TABLE = _crc_table()


def crc16(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC16 of P1 telegrams (reflected polynomial 0xA001, initial value 0, no final XOR)."""
    for byte in bytes(data):
        crc = (crc >> 8) ^ _CRC_TABLE[(crc ^ byte) & 0xFF]
    return crc


@dataclass
class FramerStats:
    """What the framer passed on and what it dropped, since it was made."""

    telegrams: int = 0
    #: Telegrams whose CRC did not match.
    bad_crc: int = 0
    #: Telegrams cut short by a new ``/`` or ended by a ``!`` without a valid trailer.
    truncated: int = 0
    #: Telegrams that grew past ``max_bytes`` without their ``!``.
    oversized: int = 0
    #: Bytes discarded outside any telegram, including those of dropped telegrams.
    discarded_bytes: int = 0


class TelegramFramer:
    """Cut complete P1 telegrams out of a byte stream fed in pieces of any size.

    ``require_crc=False`` also accepts ``!`` CR LF without a CRC (DSMR 2.2 and 3 send no CRC); a CRC that is
    present is checked either way.
    """

    def __init__(self, *, max_bytes: int = MAX_TELEGRAM_BYTES, require_crc: bool = True) -> None:
        """Start hunting for a ``/``."""
        if max_bytes < 16:
            raise ValueError("max_bytes must be at least 16")
        self.max_bytes = max_bytes
        self.require_crc = require_crc
        self.stats = FramerStats()
        self._buf = bytearray()  # empty, or a telegram from its "/" on
        self._scanned = 0  # bytes of _buf already searched for "/" and "!"
        self._end = -1  # index of the telegram's "!" once seen

    @property
    def buffered(self) -> int:
        """Bytes held now (of a telegram not yet complete)."""
        return len(self._buf)

    def reset(self) -> None:
        """Forget a telegram begun but not finished (the line was reopened); it counts as truncated."""
        if self._buf:
            self.stats.truncated += 1
            self.stats.discarded_bytes += len(self._buf)
        self._reset()

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Take the next bytes of the stream; return the telegrams they complete, ``/`` to LF, in order."""
        out: list[bytes] = []
        data = bytes(data)
        while data:
            if not self._buf:
                start = data.find(b"/")
                if start < 0:
                    self.stats.discarded_bytes += len(data)
                    return out
                self.stats.discarded_bytes += start
                data = data[start:]
            room = self.max_bytes + _TRAILER - len(self._buf)
            self._buf += data[:room]
            data = data[room:]
            rest = self._scan(out)
            data = rest + data
        return out

    def _scan(self, out: list[bytes]) -> bytes:
        """Advance over the buffered telegram; return the bytes that follow a telegram ended or dropped."""
        buf = self._buf
        if self._end < 0:
            first = max(self._scanned, 1)
            start, end = buf.find(b"/", first), buf.find(b"!", first)
            if start >= 0 and (end < 0 or start < end):  # a new telegram starts before this one ended
                if start > self.max_bytes:
                    self.stats.oversized += 1
                else:
                    self.stats.truncated += 1
                return self._drop(start)
            if end < 0 or end >= self.max_bytes:  # the "!" must come within max_bytes, so the trailer fits
                self._scanned = len(buf)
                if len(buf) >= self.max_bytes:
                    self.stats.oversized += 1
                    return self._drop(start if start >= 0 else len(buf))  # keep a "/" after a late "!"
                return b""
            self._end = end
        return self._trailer(out)

    def _trailer(self, out: list[bytes]) -> bytes:
        """Check what follows the ``!``: four hex digits and CR LF (or CR LF alone without a CRC)."""
        buf, end = self._buf, self._end
        tail = bytes(buf[end + 1 : end + 1 + _TRAILER])
        if not self.require_crc and tail[:1] == b"\r":
            if len(tail) < 2:
                return b""
            if tail[1:2] == b"\n":
                return self._emit(out, end + 3, None)
            self.stats.truncated += 1
            return self._drop(end + 1)
        for i, byte in enumerate(tail):
            ok = byte in _HEX if i < 4 else byte == (b"\r\n"[i - 4])
            if not ok:
                self.stats.truncated += 1
                return self._drop(end + 1 + i)
        if len(tail) < _TRAILER:
            return b""
        return self._emit(out, end + 1 + _TRAILER, int(tail[:4], 16))

    def _emit(self, out: list[bytes], length: int, crc: int | None) -> bytes:
        """Pass the telegram of `length` bytes on if its CRC matches (or it has none and none is needed)."""
        telegram = bytes(self._buf[:length])
        if crc is not None and crc16(telegram[: self._end + 1]) != crc:
            self.stats.bad_crc += 1
            return self._drop(length)
        self.stats.telegrams += 1
        out.append(telegram)
        rest = bytes(self._buf[length:])
        self._reset()
        return rest

    def _drop(self, upto: int) -> bytes:
        """Discard the first `upto` buffered bytes (a dropped telegram); return what follows them."""
        self.stats.discarded_bytes += upto
        rest = bytes(self._buf[upto:])
        self._reset()
        return rest

    def _reset(self) -> None:
        """Hunt for the next ``/``."""
        self._buf = bytearray()
        self._scanned = 0
        self._end = -1
