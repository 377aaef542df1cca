"""The copies a chunk needs, as plain functions a worker thread or the loop runs: gather and encode for a
codec, compiled gather / scatter between pages and a buffer, and writing chunks straight into a peer's memory."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from . import kernels
from .placement import ShmWriter, buffer_address
from .transfers import Outgoing

if TYPE_CHECKING:
    from .placement import CmaWriter
    from .wire_codec import ChunkCodec
from .planner import PieceLists


def _encode(
    codec: ChunkCodec,
    views: list[memoryview],
    lists: PieceLists,
    first: int,
    last: int,
    buffers: tuple[memoryview, memoryview],
    checksum: Any,
) -> tuple[memoryview, int]:
    """Worker thread: gather pieces ``first:last`` of a chunk, encode them; returns the payload and its checksum."""
    src_seg, src_off, piece_len = lists.src_seg, lists.src_off, lists.piece_len
    if last - first == 1:
        offset = src_off[first]
        source = views[src_seg[first]][offset : offset + piece_len[first]]
    else:
        gathered, pos = buffers[0], 0
        for k in range(first, last):
            n, offset = piece_len[k], src_off[k]
            gathered[pos : pos + n] = views[src_seg[k]][offset : offset + n]
            pos += n
        source = gathered[:pos]
    payload = codec.encode(source, buffers[1])
    return payload, checksum(payload) if checksum else 0


def _offsets(lengths: np.ndarray) -> np.ndarray:
    offsets = np.zeros(len(lengths), dtype=np.uint64)
    np.cumsum(lengths[:-1], out=offsets[1:])
    return offsets


def _gather(addr: np.ndarray, lengths: np.ndarray, staging: memoryview, hashes: int) -> int | None:
    """Copy the pieces at ``addr`` into ``staging`` back to back; their checksum (xxh3) when ``hashes``."""
    value = kernels.copy_pages(addr, buffer_address(staging) + _offsets(lengths), lengths, hashes)[0]
    return value if hashes else None


def _scatter(payload: memoryview, dst: np.ndarray, lengths: np.ndarray, hashes: int) -> int:
    """Copy ``payload`` out to the pieces at ``dst``; its checksum (xxh3) when ``hashes``, else 0."""
    return kernels.copy_pages(buffer_address(payload) + _offsets(lengths), dst, lengths, hashes)[0]


def _place(
    placer: CmaWriter | ShmWriter, out: Outgoing, seqs: list[int], views: list[memoryview], checksum: Any, fused: bool
) -> list[tuple[int, int | None]]:
    """Worker thread: write chunks ``seqs`` into the peer, unless the transfer ended meanwhile (an abort fences
    writes: none starts once the transfer is over). Per chunk: the source checksum and, where the copy
    checksummed the pages where they landed in the same pass (shared memory, xxh3), that one too."""
    table = out.table
    ptr = table.piece_ptr
    results: list[tuple[int, int | None]] = []
    for seq in seqs:
        if out.stopped:
            return results
        first, last = int(ptr[seq]), int(ptr[seq + 1])
        src_seg, src_off, lengths = table.src_seg[first:last], table.src_off[first:last], table.piece_len[first:last]
        dst_seg, dst_off = table.dst_seg[first:last], table.dst_off[first:last]
        if fused and isinstance(placer, ShmWriter):
            results.append(placer.write_checked(src_seg, src_off, dst_seg, dst_off, lengths))
            continue
        value = 0
        if fused:  # CMA: the kernel copies; the source checksum runs compiled, without the GIL
            value = placer.source_checksum(src_seg, src_off, lengths)  # type: ignore[union-attr]
        elif checksum is not None:
            value = int(checksum([views[s][o : o + n] for s, o, n in zip(src_seg.tolist(), src_off.tolist(), lengths.tolist())]))
        if out.stopped:
            return results
        placer.write(src_seg, src_off, dst_seg, dst_off, lengths)
        results.append((value, None))
    return results
