"""fletcher64: the per-chunk checksum of device memory, computed where the bytes are (GPU or host), bit-for-bit alike.

The bytes, zero-padded to whole little-endian 64-bit words ``w_0 … w_{m-1}``, give two sums modulo 2**64:
``s1 = Σ w_i`` and ``s2 = Σ (i + 1)·w_i`` (Fletcher's pair, with the second sum weighted by position instead of
accumulated). Any change to one word moves ``s1``; swapped or shifted words move ``s2``. Both are reductions, so
a GPU computes them in two passes over the chunk with torch's own kernels, and only the two sums (16 bytes)
cross to the host, never the payload. The host form (numpy) is the same function, so a GPU sender's chunk is
verified by a host receiver and the other way round. Sums compose over pieces (``s2`` of a piece that starts at
word ``k`` is its own ``s2`` plus ``k·s1``), which is how scattered pages are checksummed without joining them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

__all__ = ["combine", "fletcher64", "fletcher64_pieces", "host_sums"]

_M64 = (1 << 64) - 1
_MASK = (1 << 63) - 1  # 63 bits: the wire format's checksum is a signed 64-bit bound
_MIX = 0x9E3779B97F4A7C15
_LENGTH = 0xC2B2AE3D27D4EB4F


def combine(s1: int, s2: int, nbytes: int) -> int:
    """The checksum of ``nbytes`` bytes from their two sums (either sign: taken modulo 2**64)."""
    s1 &= _M64
    s2 &= _M64
    return (s1 ^ ((s2 * _MIX) & _M64) ^ ((nbytes * _LENGTH) & _M64)) & _MASK


def _words(buf: Any) -> np.ndarray:
    data = np.frombuffer(buf, dtype=np.uint8)
    whole = data.nbytes // 8 * 8
    words = data[:whole].view("<u8")
    if whole == data.nbytes:
        return words
    tail = np.zeros(8, dtype=np.uint8)
    tail[: data.nbytes - whole] = data[whole:]
    return np.concatenate([words, tail.view("<u8")])


def host_sums(buf: Any) -> tuple[int, int]:
    """``(s1, s2)`` of a host buffer."""
    words = _words(buf)
    if not len(words):
        return 0, 0
    with np.errstate(over="ignore"):
        weights = np.arange(1, len(words) + 1, dtype=np.uint64)
        return int(words.sum(dtype=np.uint64)), int(np.dot(words, weights))


def fletcher64(buf: Any) -> int:
    """The checksum of a host buffer (anything with the buffer protocol)."""
    s1, s2 = host_sums(buf)
    return combine(s1, s2, memoryview(buf).nbytes)


def fletcher64_pieces(pieces: Iterable[Any]) -> int:
    """The checksum of the pieces' concatenation without joining them (pieces of whole words but the last)."""
    s1 = s2 = 0
    words = nbytes = 0
    for piece in pieces:
        size = memoryview(piece).nbytes
        if nbytes % 8:  # a piece after a ragged one: the word boundaries moved, join from here
            raise ValueError("fletcher64_pieces: only the last piece may end mid-word")
        a, b = host_sums(piece)
        s2 = (s2 + b + words * a) & _M64
        s1 = (s1 + a) & _M64
        words += (size + 7) // 8
        nbytes += size
    return combine(s1, s2, nbytes)
