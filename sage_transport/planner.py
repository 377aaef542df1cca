"""Planner: a transfer's block mapping → a :class:`ChunkTable` of chunks, vectorised with numpy.

Pages are ordered by source memory (by layer first in a progressive plan), runs of pages contiguous on
*both* sides are coalesced, runs longer than ``chunk_size`` are split at multiples of it, and short
pieces are gathered (packed whole, never split) into chunks of at most ``chunk_size`` when ``gather``
is on. Sender and receiver run the same pure function on the same inputs and so agree on every chunk;
the sender's ``digest`` lets the receiver check that.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import xxhash

from .errors import PlanError
from .memory import KVGeometry
from .plan import BlockMapping, KVChunk, Priority
from .schema import DType, KVCacheSchema

__all__ = ["ChunkTable", "plan_chunks"]

_I64 = np.int64


@dataclass(eq=False)
class ChunkTable:
    """Chunks of one transfer as arrays (structure of arrays); pieces are in CSR form under ``piece_ptr``."""

    schema: KVCacheSchema
    chunk_size: int
    progressive: bool
    piece_ptr: np.ndarray  # [chunks + 1]
    chunk_nbytes: np.ndarray  # [chunks]
    chunk_layer_lo: np.ndarray  # [chunks] first layer touched
    chunk_layer_hi: np.ndarray  # [chunks] last layer touched (inclusive)
    src_seg: np.ndarray  # [pieces]
    src_off: np.ndarray
    dst_seg: np.ndarray
    dst_off: np.ndarray
    piece_len: np.ndarray
    _lists: PieceLists | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.chunk_nbytes)

    @property
    def total_bytes(self) -> int:
        return int(self.piece_len.sum())

    @property
    def max_chunk_bytes(self) -> int:
        return int(self.chunk_nbytes.max()) if len(self) else 0

    @functools.cached_property
    def digest(self) -> int:  # 63 bits: fits the wire format's signed 64-bit bound
        """xxh3 of the chunk and piece sizes and destinations: equal tables have equal digests."""
        h = xxhash.xxh3_64()
        for arr in (self.piece_ptr, self.piece_len, self.dst_seg, self.dst_off):
            h.update(np.ascontiguousarray(arr, dtype=_I64).tobytes())
        return h.intdigest() & ((1 << 63) - 1)

    def lists(self) -> PieceLists:
        """Python-int lists of the arrays, each built on its first use: indexing them is the cheapest per-chunk
        access, and a path that reads the per-piece arrays with numpy (direct placement) never builds those."""
        if self._lists is None:
            self._lists = PieceLists(self)
        return self._lists

    def layer_chunk_ranges(self) -> list[tuple[int, int]]:
        """For a progressive table (chunks sorted by layer, one layer each): ``[start, stop)`` chunks per layer."""
        layers = np.arange(self.schema.num_layers)
        starts = np.searchsorted(self.chunk_layer_lo, layers, side="left")
        stops = np.searchsorted(self.chunk_layer_lo, layers, side="right")
        return list(zip(starts.tolist(), stops.tolist()))

    def chunks_per_layer(self) -> list[int]:
        """How many chunks touch each layer (a chunk spanning layers counts for each)."""
        diff = np.zeros(self.schema.num_layers + 1, dtype=_I64)
        np.add.at(diff, self.chunk_layer_lo, 1)
        np.add.at(diff, self.chunk_layer_hi + 1, -1)
        counts: list[int] = np.cumsum(diff[:-1]).tolist()
        return counts

    def chunk(
        self,
        seq: int,
        *,
        transfer_id: str = "",
        priority: Priority = Priority.NORMAL,
        wire_dtype: DType | None = None,
    ) -> KVChunk:
        """Materialise chunk ``seq`` as a :class:`KVChunk` (for inspection; the hot path uses :meth:`lists`)."""
        if not 0 <= seq < len(self):
            raise IndexError(f"chunk {seq} out of range 0..{len(self) - 1}")
        lo, hi = int(self.piece_ptr[seq]), int(self.piece_ptr[seq + 1])
        src = tuple((int(s), int(o), int(n)) for s, o, n in zip(self.src_seg[lo:hi], self.src_off[lo:hi], self.piece_len[lo:hi]))
        dst = tuple((int(s), int(o), int(n)) for s, o, n in zip(self.dst_seg[lo:hi], self.dst_off[lo:hi], self.piece_len[lo:hi]))
        offset = int(self.chunk_nbytes[:seq].sum())
        return KVChunk(
            transfer_id=transfer_id,
            seq=seq,
            layer_start=int(self.chunk_layer_lo[seq]),
            layer_stop=int(self.chunk_layer_hi[seq]) + 1,
            src_runs=src,
            dst_runs=dst,
            offset=offset,
            nbytes=int(self.chunk_nbytes[seq]),
            priority=priority,
            wire_dtype=wire_dtype or self.schema.dtype,
        )


class PieceLists:
    """A :class:`ChunkTable`'s columns as Python-int lists (``lists.piece_ptr``, ``lists.chunk_nbytes``, ...), each
    built from its array on first access and an ordinary attribute after that (no lookup by name per chunk)."""

    piece_ptr: list[int]
    chunk_nbytes: list[int]
    src_seg: list[int]
    src_off: list[int]
    dst_seg: list[int]
    dst_off: list[int]
    piece_len: list[int]

    def __init__(self, table: ChunkTable) -> None:
        self._table = table

    def __getattr__(self, name: str) -> list[int]:  # only for a column not built yet
        if name.startswith("_"):
            raise AttributeError(name)
        value: list[int] = getattr(self._table, name).tolist()
        setattr(self, name, value)
        return value


def _locate(
    geometry: KVGeometry, schema: KVCacheSchema, layer: np.ndarray, plane: np.ndarray, block: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    in_buffer, segment = geometry.strides(schema)
    index = {"layer": layer, "plane": plane, "block": block}
    offset = np.zeros(len(layer), dtype=_I64)
    for axis, stride in in_buffer.items():
        offset += index[axis] * stride
    seg = np.zeros(len(layer), dtype=_I64)
    for axis, stride in segment.items():
        seg += index[axis] * stride
    return seg, offset * schema.page_bytes


def _pages(
    schema: KVCacheSchema, mappings: Sequence[BlockMapping], src: KVGeometry, dst: KVGeometry
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    planes = schema.kv_planes
    layers, plane_ids, src_blocks, dst_blocks = [], [], [], []
    for m in mappings:
        if m.layer_stop > schema.num_layers:
            raise PlanError(f"layer range [{m.layer_start}, {m.layer_stop}) exceeds num_layers={schema.num_layers}")
        s = np.fromiter(m.src_blocks, dtype=_I64, count=len(m.src_blocks))
        d = np.fromiter(m.dst_blocks, dtype=_I64, count=len(m.dst_blocks))
        if int(s.max()) >= src.num_blocks:
            raise PlanError(f"src block {int(s.max())} is out of range: the source holds {src.num_blocks} blocks")
        if int(d.max()) >= dst.num_blocks:
            raise PlanError(f"dst block {int(d.max())} is out of range: the destination holds {dst.num_blocks} blocks")
        nl, n = m.layer_stop - m.layer_start, len(s)
        layers.append(np.repeat(np.arange(m.layer_start, m.layer_stop, dtype=_I64), planes * n))
        plane_ids.append(np.tile(np.repeat(np.arange(planes, dtype=_I64), n), nl))
        src_blocks.append(np.tile(s, nl * planes))
        dst_blocks.append(np.tile(d, nl * planes))
    return tuple(np.concatenate(a) for a in (layers, plane_ids, src_blocks, dst_blocks))  # type: ignore[return-value]


#: plans of at most this many blocks (all mappings together) are planned once per geometry and reused
CACHED_PLAN_BLOCKS = 256


def plan_chunks(
    schema: KVCacheSchema,
    mappings: Sequence[BlockMapping],
    src: KVGeometry,
    dst: KVGeometry,
    chunk_size: int,
    *,
    gather: bool = True,
    progressive: bool = False,
) -> ChunkTable:
    """Split a mapping into chunks of at most ``chunk_size`` bytes. Pure and deterministic, so a small plan (a decode
    step's few blocks, repeated every step with the same blocks) comes from a cache instead of ~70 µs of numpy."""
    if chunk_size < 1:
        raise PlanError(f"chunk_size={chunk_size!r} must be positive")
    if sum(len(m.src_blocks) for m in mappings) <= CACHED_PLAN_BLOCKS:
        return _plan_cached(schema, tuple(mappings), src, dst, chunk_size, gather, progressive)
    return _plan(schema, mappings, src, dst, chunk_size, gather, progressive)


@functools.lru_cache(maxsize=1024)
def _plan_cached(
    schema: KVCacheSchema,
    mappings: tuple[BlockMapping, ...],
    src: KVGeometry,
    dst: KVGeometry,
    chunk_size: int,
    gather: bool,
    progressive: bool,
) -> ChunkTable:
    table = _plan(schema, mappings, src, dst, chunk_size, gather, progressive)
    for array in (table.piece_ptr, table.chunk_nbytes, table.chunk_layer_lo, table.chunk_layer_hi, table.src_seg,
                  table.src_off, table.dst_seg, table.dst_off, table.piece_len):  # fmt: skip
        array.flags.writeable = False  # shared by every transfer of this shape
    return table


def _plan(
    schema: KVCacheSchema,
    mappings: Sequence[BlockMapping],
    src: KVGeometry,
    dst: KVGeometry,
    chunk_size: int,
    gather: bool,
    progressive: bool,
) -> ChunkTable:
    page = schema.page_bytes
    layer, plane, sblock, dblock = _pages(schema, mappings, src, dst)
    src_seg, src_off = _locate(src, schema, layer, plane, sblock)
    dst_seg, dst_off = _locate(dst, schema, layer, plane, dblock)
    keys: tuple[np.ndarray, ...] = (src_off, src_seg, layer) if progressive else (src_off, src_seg)
    order = np.lexsort(keys)
    layer, src_seg, src_off, dst_seg, dst_off = (a[order] for a in (layer, src_seg, src_off, dst_seg, dst_off))
    npages = len(layer)

    joined = (
        (src_seg[1:] == src_seg[:-1])
        & (dst_seg[1:] == dst_seg[:-1])
        & (src_off[1:] == src_off[:-1] + page)
        & (dst_off[1:] == dst_off[:-1] + page)
    )
    if progressive:
        joined &= layer[1:] == layer[:-1]
    run_start = np.flatnonzero(np.concatenate(([True], ~joined)))
    run_bytes = np.diff(np.append(run_start, npages)) * page

    cap = (chunk_size // page) * page if chunk_size >= page else chunk_size
    pieces_per_run = -(-run_bytes // cap)
    piece_run = np.repeat(np.arange(len(run_start), dtype=_I64), pieces_per_run)
    first_piece = np.cumsum(pieces_per_run) - pieces_per_run
    piece_in_run = (np.arange(len(piece_run), dtype=_I64) - first_piece[piece_run]) * cap
    piece_len = np.minimum(cap, run_bytes[piece_run] - piece_in_run)
    run_page = run_start[piece_run]
    p_src_seg, p_dst_seg = src_seg[run_page], dst_seg[run_page]
    p_src_off, p_dst_off = src_off[run_page] + piece_in_run, dst_off[run_page] + piece_in_run
    piece_first_page = run_page + piece_in_run // page
    piece_lo = np.minimum.reduceat(layer, piece_first_page)
    piece_hi = np.maximum.reduceat(layer, piece_first_page)

    if gather:
        chunk_start = _pack(piece_len, piece_lo if progressive else None, chunk_size)
    else:
        chunk_start = np.arange(len(piece_len), dtype=_I64)
    return ChunkTable(
        schema=schema,
        chunk_size=chunk_size,
        progressive=progressive,
        piece_ptr=np.append(chunk_start, len(piece_len)),
        chunk_nbytes=np.add.reduceat(piece_len, chunk_start),
        chunk_layer_lo=np.minimum.reduceat(piece_lo, chunk_start),
        chunk_layer_hi=np.maximum.reduceat(piece_hi, chunk_start),
        src_seg=p_src_seg,
        src_off=p_src_off,
        dst_seg=p_dst_seg,
        dst_off=p_dst_off,
        piece_len=piece_len,
    )


def _pack(piece_len: np.ndarray, group: np.ndarray | None, chunk_size: int) -> np.ndarray:
    """First piece of each chunk when packing pieces greedily, in order, never across a group change."""
    n = len(piece_len)
    if group is None:
        group_start = np.zeros(1, dtype=_I64)
    else:
        group_start = np.flatnonzero(np.concatenate(([True], group[1:] != group[:-1])))
    size = int(piece_len[0])
    if bool((piece_len == size).all()):
        per_chunk = max(1, chunk_size // size)
        group_of = np.repeat(np.arange(len(group_start)), np.diff(np.append(group_start, n)))
        index_in_group = np.arange(n, dtype=_I64) - group_start[group_of]
        return np.flatnonzero(index_in_group % per_chunk == 0)
    group_stop = np.append(group_start[1:], n).tolist()
    ends = np.cumsum(piece_len)
    starts: list[int] = []
    if int(ends[-1]) // chunk_size + len(group_stop) < n // 8:
        # few chunks: jump from chunk to chunk with a binary search on the running byte count
        i, g = 0, 0
        while i < n:
            starts.append(i)
            while group_stop[g] <= i:
                g += 1
            base = int(ends[i - 1]) if i else 0
            i = min(max(int(np.searchsorted(ends, base + chunk_size, side="right")), i + 1), group_stop[g])
    else:
        boundaries = set(group_start.tolist())
        acc = chunk_size + 1
        for i, length in enumerate(piece_len.tolist()):
            if i in boundaries or acc + length > chunk_size:
                starts.append(i)
                acc = 0
            acc += length
    return np.asarray(starts, dtype=_I64)
