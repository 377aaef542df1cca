"""The compiled copy and checksum loops: bit-for-bit the checksum the Python path computes, copies in order."""

from __future__ import annotations

import numpy as np
import pytest

from sage_transport import kernels
from sage_transport.config import Integrity
from sage_transport.integrity import streaming_checksum_function

pytestmark = pytest.mark.skipif(not kernels.AVAILABLE, reason="numba or xxhash's C API is missing")


def _pieces(rng: np.random.Generator, size: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` non-overlapping pieces of a ``size``-byte buffer, in shuffled order: offsets and lengths."""
    lengths = rng.integers(1, size // (2 * count), count)
    gaps = rng.integers(0, size // (2 * count), count)
    starts = np.cumsum(gaps + np.concatenate(([0], lengths[:-1])))
    order = rng.permutation(count)
    return starts[order].astype(np.uint64), lengths[order].astype(np.uint64)


@pytest.mark.parametrize("seed", range(5))
def test_copy_pages_copies_every_piece_and_checksums_both_ends(seed: int) -> None:
    rng = np.random.default_rng(seed)
    src = rng.integers(0, 256, 1 << 20, dtype=np.uint8)
    dst = np.zeros(1 << 20, dtype=np.uint8)
    src_off, lengths = _pieces(rng, src.size, 64)
    dst_off = 7 + np.cumsum(np.concatenate(([0], lengths[:-1]))).astype(np.uint64)  # back to back, unaligned
    reference = streaming_checksum_function(Integrity.XXH3)([src[int(o) : int(o + n)] for o, n in zip(src_off, lengths)])
    source, landed = kernels.copy_pages(src.ctypes.data + src_off, dst.ctypes.data + dst_off, lengths, 2)
    assert source == landed == reference
    for so, do, n in zip(src_off.tolist(), dst_off.tolist(), lengths.tolist()):
        assert np.array_equal(dst[do : do + n], src[so : so + n])
    assert kernels.hash_pages(dst.ctypes.data + dst_off, lengths) == reference


def test_copy_pages_reports_only_the_checksums_asked_for() -> None:
    src = np.arange(4096, dtype=np.uint8)
    dst = np.zeros(4096, dtype=np.uint8)
    one = np.array([src.ctypes.data], dtype=np.uint64)
    assert kernels.copy_pages(one, np.array([dst.ctypes.data], dtype=np.uint64), np.array([4096]), 0) == (0, 0)
    assert np.array_equal(dst, src)
    value, landed = kernels.copy_pages(one, np.array([dst.ctypes.data], dtype=np.uint64), np.array([4096]), 1)
    assert value == streaming_checksum_function(Integrity.XXH3)([src]) and landed == 0


def test_a_corrupted_destination_changes_the_landed_checksum() -> None:
    src = np.arange(8192, dtype=np.uint8)
    dst = np.zeros(8192, dtype=np.uint8)
    lengths = np.array([4096, 4096], dtype=np.uint64)
    addr = src.ctypes.data + np.array([4096, 0], dtype=np.uint64)
    source, _ = kernels.copy_pages(addr, dst.ctypes.data + np.array([0, 4096], dtype=np.uint64), lengths, 2)
    dst[5] ^= 1
    assert kernels.hash_pages(dst.ctypes.data + np.array([0, 4096], dtype=np.uint64), lengths) != source


async def test_an_event_loop_never_waits_for_the_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    """Until the loops are compiled, transfers gather, scatter and verify on the numpy/xxhash path: the first
    transfers after register() do not sit on the event loop's thread waiting for numba (0.5 s measured)."""
    from sage_transport import KVTransportConfig, TransferPlan

    from .conftest import SMALL, channel_pair

    def compiled(*args: object) -> None:
        raise AssertionError("a compiled loop was called before it was ready")

    monkeypatch.setattr(kernels, "_warm", False)
    monkeypatch.setattr(kernels, "warm_up_in_background", lambda: None)
    monkeypatch.setattr(kernels, "copy_pages", compiled)
    monkeypatch.setattr(kernels, "hash_pages", compiled)
    async with channel_pair(config=KVTransportConfig(chunk_size=4096, gather=True)) as pair:
        dst = list(np.random.default_rng(1).permutation(32))
        result = await pair.sender.transfer(TransferPlan.for_blocks(pair.peer, SMALL, range(32), dst))
        assert result.integrity.value == "verified" and result.chunks > 1
        src_pages = pair.src_pages()
        dst_pages = np.frombuffer(pair.dst.buffers[0], np.uint8).reshape(src_pages.shape)
        assert np.array_equal(dst_pages[:, :, dst], src_pages[:, :, :32])
