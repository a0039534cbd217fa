"""CRC-32C (Castagnoli), the checksum of TensorFlow's checkpoint tables and tensors.

``google-crc32c`` computes it in C at memory speed. Without its C build, a numpy version runs
65536 byte lanes side by side and joins their CRCs through the CRC's linearity (appending ``n``
zero bytes is a linear map of the 32-bit register), so converting a full-size checkpoint still
takes seconds rather than minutes. TensorFlow stores checksums *masked* (``crc32c.h``: rotate
right by 15 bits and add a constant) so that the CRC of data that holds CRCs stays well spread.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

POLYNOMIAL = 0x82F63B78  # Castagnoli, bit-reflected
MASK_DELTA = 0xA282EAD8
LANES = 65536
MAX_LANE_BYTES = 64
MIN_LANE_BYTES = 16
U32 = 0xFFFFFFFF


def _table() -> np.ndarray:
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(POLYNOMIAL), table >> 1).astype(np.uint32)
    return table


TABLE = _table()
_TABLE_LIST = [int(v) for v in TABLE]


def mask(crc: int) -> int:
    """The masked form TensorFlow stores."""
    return ((((crc >> 15) | (crc << 17)) & U32) + MASK_DELTA) & U32


def unmask(masked: int) -> int:
    """Inverse of ``mask``."""
    rotated = (masked - MASK_DELTA) & U32
    return ((rotated >> 17) | (rotated << 15)) & U32


def _bytewise(register: int, data: memoryview) -> int:
    for byte in data:
        register = _TABLE_LIST[(register ^ byte) & 0xFF] ^ (register >> 8)
    return register


def _apply(operator: np.ndarray, registers: np.ndarray) -> np.ndarray:
    """A linear map of 32-bit registers, given as four 256-entry tables (one per register byte)."""
    return (operator[0][registers & 0xFF] ^ operator[1][(registers >> 8) & 0xFF]
            ^ operator[2][(registers >> 16) & 0xFF] ^ operator[3][registers >> 24])


def _operator(images: np.ndarray) -> np.ndarray:
    """Byte tables of the linear map sending bit ``i`` to ``images[i]``."""
    index = np.arange(256)
    tables = np.zeros((4, 256), dtype=np.uint32)
    for bit in range(32):
        tables[bit // 8][(index >> (bit % 8)) & 1 == 1] ^= images[bit]
    return tables


@lru_cache(maxsize=64)
def _zeros_operator(count: int) -> np.ndarray:
    """The map of the raw register over ``count`` zero bytes (square-and-multiply on one zero byte)."""
    basis = np.uint32(1) << np.arange(32, dtype=np.uint32)
    power = _operator(TABLE[basis & 0xFF] ^ (basis >> 8))
    result = None
    while count:
        if count & 1:
            result = power if result is None else _operator(_apply(power, _apply(result, basis)))
        count >>= 1
        if count:
            power = _operator(_apply(power, _apply(power, basis)))
    return result


def _lanes(register: int, data: memoryview, lanes: int, length: int) -> int:
    """Raw register after ``lanes * length`` bytes (``length`` a multiple of 4). Each lane takes
    ``length`` consecutive bytes, four at a time (``register ^ word`` then four zero bytes);
    lane 0 starts from ``register``, the others from 0. Pairs are then joined as
    ``zeros(len(right))(left) ^ right`` until one lane is left."""
    words = np.frombuffer(data, dtype="<u4").reshape(lanes, length // 4).T.copy()
    step = _zeros_operator(4)
    state = np.zeros(lanes, dtype=np.uint32)
    state[0] = register
    for word in words:
        state = _apply(step, state ^ word)
    while len(state) > 1:
        state = _apply(_zeros_operator(length), state[0::2]) ^ state[1::2]
        length *= 2
    return int(state[0])


def crc32c_numpy(data, crc: int = 0) -> int:
    """``crc32c`` without ``google-crc32c``: vectorised over byte lanes, bytewise for the last bytes."""
    view = memoryview(data).cast("B")
    register, position = crc ^ U32, 0
    while len(view) - position >= MIN_LANE_BYTES * 64:
        remaining = len(view) - position
        lanes = min(LANES, 1 << ((remaining // MIN_LANE_BYTES).bit_length() - 1))
        length = min(MAX_LANE_BYTES, remaining // lanes) // 4 * 4
        register = _lanes(register, view[position: position + lanes * length], lanes, length)
        position += lanes * length
    return _bytewise(register, view[position:]) ^ U32


def _google_extend():
    """``google_crc32c.extend`` when its C build is installed (its pure-Python build is slower than numpy)."""
    try:
        import google_crc32c
    except ImportError:
        return None
    return google_crc32c.extend if google_crc32c.implementation == "c" else None


_FAST_EXTEND = _google_extend()


def crc32c(data, crc: int = 0) -> int:
    """CRC-32C of ``data`` (any bytes-like object), continuing from ``crc``, the CRC of the bytes before it."""
    if _FAST_EXTEND is not None:
        return _FAST_EXTEND(crc, data)
    return crc32c_numpy(data, crc)
