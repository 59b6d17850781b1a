"""Pure register codecs: IEEE 754 float32 over two 16-bit registers, big-endian, high word first."""

from __future__ import annotations

import struct
from collections.abc import Sequence

_F32 = struct.Struct(">f")
_TWO_REGS = struct.Struct(">HH")


def decode_float32(registers: Sequence[int], offset: int = 0) -> float:
    """Decode the float32 held in ``registers[offset]`` (high word) and ``registers[offset + 1]``."""
    if offset < 0 or offset + 2 > len(registers):
        raise ValueError(f"float32 at offset {offset} lies outside {len(registers)} registers")
    high, low = registers[offset], registers[offset + 1]
    return float(_F32.unpack(_TWO_REGS.pack(high, low))[0])


def encode_float32(value: float) -> list[int]:
    """Encode `value` as two registers, high word first."""
    high, low = _TWO_REGS.unpack(_F32.pack(value))
    return [high, low]
