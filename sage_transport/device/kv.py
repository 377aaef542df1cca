"""Device-resident KV: a chunk gathered, checksummed, encoded and scattered where the KV lives, in batched kernels.

A chunk table's pieces are whole pages (or whole codec groups). Every registered tensor lies inside one
:class:`Span`, a view over the address range from the lowest tensor to the end of the highest, cut into rows of a
size that divides every piece and every tensor's offset in it; a chunk is then one list of row indices (uploaded
to the device once per transfer), and one ``index_select`` (gather) or ``index_copy_`` (scatter) moves it, however
many blocks and tensors (layers) it touches. Only rows inside the tensors are ever indexed: the gaps between
allocations are never read or written. Where no span can be made, a chunk falls back to *runs* (consecutive rows
of one tensor): one slice copy or one index kernel per run, still never one Python call per block. Checksums
(:mod:`.checksum`) reduce on the device and only their 16 bytes come back; codecs (:mod:`..codec`) quantise on the
device, so only encoded bytes leave it. Every step is queued on the runtime's stream and awaited through an event
(:func:`.runtime.wait`).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConfigError, ProtocolError
from .checksum import combine
from .runtime import DeviceRuntime, wait

if TYPE_CHECKING:
    from ..planner import ChunkTable
    from ..wire_codec import ChunkCodec

__all__ = ["DeviceKV", "Rows", "Span"]

_WORD = 8
_MAX_SPAN = 1 << 46  # an address range no wider than this is viewed whole (a view costs no memory)


@dataclass(eq=False)
class Rows:
    """One side of a chunk table as runs of rows: ``run_*`` lists per run, ``run_ptr[seq]:run_ptr[seq+1]`` a chunk's."""

    unit: int  # bytes per row
    chunk_rows: list[int]  # [chunks + 1] first row of each chunk (rows in payload order)
    run_ptr: list[int]
    run_start: list[int]  # first row of the run (payload order)
    run_stop: list[int]
    run_seg: list[int]
    run_first: list[int]  # row index in its tensor of the run's first row, when contiguous; -1 otherwise
    index: Any  # int64 device tensor: every row's index in its tensor (None when every run is contiguous)
    span: Any = None  # the Span the rows index (then ``run_*`` are empty)
    span_unit: int = 0  # bytes per span row (divides ``unit``)
    span_index: Any = None  # int64 device tensor: every span row of the table, in payload order


class Span:
    """One byte view over the address range holding every tensor of a KV cache (ours, or a peer's mapped one)."""

    def __init__(self, segments: list[Any], runtime: DeviceRuntime) -> None:
        import ctypes

        import torch

        pointers = [int(seg.data_ptr()) for seg in segments]
        base = min(pointers)
        end = max(p + int(seg.numel()) for p, seg in zip(pointers, segments))
        if end - base > _MAX_SPAN:
            raise ValueError(f"tensors {end - base} bytes apart")
        self.offsets = np.array([p - base for p in pointers], dtype=np.int64)
        self.alignment = int(np.gcd.reduce(np.append(self.offsets, base)))
        if runtime.device.type == "cpu":  # emulated: host tensors, viewed through ctypes at the same addresses
            self.view = torch.frombuffer((ctypes.c_ubyte * (end - base)).from_address(base), dtype=torch.uint8)
        else:
            from .ipc import device_range

            self.view = torch.as_tensor(device_range(base, end - base))
        self._rows: dict[int, Any] = {}

    def unit_for(self, unit: int) -> int:
        """The span row size for a table of ``unit``-byte rows: divides ``unit`` and every tensor's offset."""
        return math.gcd(unit, self.alignment)

    def rows(self, unit: int) -> Any:
        view = self._rows.get(unit)
        if view is None:
            import torch

            dtype = _element(unit, [int(self.view.data_ptr())])
            width = unit // torch.empty(0, dtype=dtype).element_size()
            whole = self.view.numel() // unit * unit
            view = self._rows[unit] = self.view[:whole].view(dtype).view(-1, width)
        return view


def table_unit(table: ChunkTable, offsets: np.ndarray, page_bytes: int) -> int:
    """The largest row size dividing every piece of ``table`` (offsets on one side) and the page."""
    return int(np.gcd.reduce(np.concatenate([offsets, table.piece_len, np.array([page_bytes], dtype=offsets.dtype)])))


def build_rows(table: ChunkTable, side: str, page_bytes: int, runtime: DeviceRuntime, span: Span | None = None) -> Rows:
    seg = (table.src_seg if side == "src" else table.dst_seg).astype(np.int64)
    off = (table.src_off if side == "src" else table.dst_off).astype(np.int64)
    unit = table_unit(table, off, page_bytes)
    counts = table.piece_len.astype(np.int64) // unit
    piece_row = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=piece_row[1:])
    total = int(piece_row[-1])
    chunk_rows = piece_row[table.piece_ptr.astype(np.int64)]
    if total == len(counts):  # one row a piece (pages scattered one by one): no expansion
        row_seg, row_idx = seg, off // unit
    else:
        row_seg = np.repeat(seg, counts)
        row_idx = np.repeat(off // unit - piece_row[:-1], counts) + np.arange(total, dtype=np.int64)
    if span is not None:  # one index list over the span: one kernel a chunk
        span_unit = span.unit_for(unit)
        per_row = unit // span_unit
        first_rows = (span.offsets[row_seg] + row_idx * unit) // span_unit
        span_rows = (first_rows[:, None] + np.arange(per_row, dtype=np.int64)).reshape(-1) if per_row > 1 else first_rows
        return Rows(unit, chunk_rows.tolist(), [], [], [], [], [], None, span, span_unit, runtime.upload(span_rows))
    cuts = np.flatnonzero(np.diff(row_seg)) + 1 if total else np.zeros(0, dtype=np.int64)
    starts = np.unique(np.concatenate([cuts, chunk_rows[:-1]]))
    starts = starts[starts < total]
    stops = np.append(starts[1:], total)
    breaks = np.zeros(total, dtype=np.int64)
    if total > 1:
        np.cumsum(np.diff(row_idx) != 1, out=breaks[1:])
    contiguous = breaks[stops - 1] == breaks[starts] if total else np.zeros(0, dtype=bool)
    first = np.where(contiguous, row_idx[starts] if total else starts, -1)
    run_ptr = np.searchsorted(starts, chunk_rows, side="left")
    index = None if bool(contiguous.all()) else runtime.upload(row_idx)
    return Rows(
        unit, chunk_rows.tolist(), run_ptr.tolist(), starts.tolist(), stops.tolist(), row_seg[starts].tolist(),
        first.tolist(), index,
    )  # fmt: skip


def _element(unit: int, pointers: list[int]) -> Any:
    import torch

    for size, dtype in ((8, torch.int64), (4, torch.int32), (2, torch.int16)):
        if unit % size == 0 and all(p % size == 0 for p in pointers):
            return dtype
    return torch.uint8


def make_span(segments: list[Any], runtime: DeviceRuntime) -> Span | None:
    """A :class:`Span` over ``segments``, or ``None`` where none can be made (chunks then move by runs)."""
    try:
        return Span(segments, runtime)
    except (ValueError, TypeError, RuntimeError, OverflowError):
        return None


class DeviceKV:
    """A registered device KV cache (one tensor per buffer) and the kernels a chunk needs on it."""

    def __init__(self, buffers: list[Any], page_bytes: int, runtime: DeviceRuntime) -> None:
        import torch

        self.torch = torch
        self.runtime = runtime
        self.page_bytes = page_bytes
        self.segments = [buf.detach().reshape(-1).view(torch.uint8) for buf in buffers]
        self.pointers = [int(seg.data_ptr()) for seg in self.segments]
        self._rows: weakref.WeakKeyDictionary[Any, dict[tuple[str, int], Rows]] = weakref.WeakKeyDictionary()
        self._views: dict[tuple[int, Any, int], Any] = {}
        self.span = make_span(self.segments, runtime)
        self._weights: Any = None
        self._device_free: list[Any] = []
        self._host_free: list[Any] = []
        self._reports: list[Any] = []
        self.shared_fds: list[int] = []  # emulated device memory over memfds (what its window hands a peer)

    # ---- tables -------------------------------------------------------------------------------------

    def rows(self, table: ChunkTable, side: str, span: Span | str | None = "ours") -> Rows:
        """``table``'s rows (``side``: ``src`` when read here, ``dst`` when written) over ``span``: ours by default,
        a peer's mapped tensors' for placement, ``None`` for runs over the tensors themselves."""
        chosen = self.span if span == "ours" else span
        cached = self._rows.get(table)
        if cached is None:
            cached = self._rows[table] = {}
        key = (side, id(chosen))
        rows = cached.get(key)
        if rows is None:
            rows = cached[key] = build_rows(table, side, self.page_bytes, self.runtime, chosen)  # type: ignore[arg-type]
        return rows

    def segment_rows(self, seg: int, unit: int, segments: list[Any] | None = None) -> Any:
        """Tensor ``seg`` as rows of ``unit`` bytes (of ``segments``: a peer's mapped tensors when given)."""
        key = (seg, id(segments) if segments is not None else None, unit)
        view = self._views.get(key)
        if view is None:
            flat = (segments if segments is not None else self.segments)[seg]
            dtype = _element(unit, [int(flat.data_ptr())])
            width = unit // self.torch.empty(0, dtype=dtype).element_size()
            view = self._views[key] = flat.view(dtype).view(-1, width)
        return view

    def _as_rows(self, buf: Any, nbytes: int, unit: int) -> Any:
        dtype = _element(unit, [int(buf.data_ptr())])
        width = unit // self.torch.empty(0, dtype=dtype).element_size()
        return buf[:nbytes].view(dtype).view(-1, width)

    def gather(self, rows: Rows, seq: int, out: Any, segments: list[Any] | None = None, last: int | None = None) -> None:
        """Queue chunk ``seq``'s pages → ``out`` (a device byte tensor), back to back (chunks ``seq`` to ``last``
        when given: one kernel for them all over the span)."""
        end = seq + 1 if last is None else last + 1
        r0, r1 = rows.chunk_rows[seq], rows.chunk_rows[end]
        if rows.span is not None:  # one kernel
            per = rows.unit // rows.span_unit
            target = self._as_rows(out, (r1 - r0) * rows.unit, rows.span_unit)
            index = rows.span_index[r0 * per : r1 * per]
            self.torch.index_select(rows.span.rows(rows.span_unit), 0, index, out=target)
            return
        target = self._as_rows(out, (r1 - r0) * rows.unit, rows.unit)
        for run in range(rows.run_ptr[seq], rows.run_ptr[end]):
            a, b = rows.run_start[run], rows.run_stop[run]
            source = self.segment_rows(rows.run_seg[run], rows.unit, segments)
            first = rows.run_first[run]
            if first >= 0:
                target[a - r0 : b - r0].copy_(source[first : first + b - a])
            else:
                self.torch.index_select(source, 0, rows.index[a:b], out=target[a - r0 : b - r0])

    def scatter(self, rows: Rows, seq: int, data: Any, segments: list[Any] | None = None, last: int | None = None) -> None:
        """Queue ``data`` (chunk ``seq``'s bytes back to back, on the device; chunks ``seq`` to ``last`` when
        given) → its pages."""
        end = seq + 1 if last is None else last + 1
        r0, r1 = rows.chunk_rows[seq], rows.chunk_rows[end]
        if rows.span is not None:  # one kernel
            per = rows.unit // rows.span_unit
            source = self._as_rows(data, (r1 - r0) * rows.unit, rows.span_unit)
            rows.span.rows(rows.span_unit).index_copy_(0, rows.span_index[r0 * per : r1 * per], source)
            return
        source = self._as_rows(data, (r1 - r0) * rows.unit, rows.unit)
        for run in range(rows.run_ptr[seq], rows.run_ptr[end]):
            a, b = rows.run_start[run], rows.run_stop[run]
            target = self.segment_rows(rows.run_seg[run], rows.unit, segments)
            first = rows.run_first[run]
            if first >= 0:
                target[first : first + b - a].copy_(source[a - r0 : b - r0])
            else:
                target.index_copy_(0, rows.index[a:b], source[a - r0 : b - r0])

    # ---- checksums ----------------------------------------------------------------------------------

    def sums(self, data: Any, nbytes: int, out: Any) -> None:
        """Queue fletcher64's two sums of ``data[:nbytes]`` (a device byte tensor) into ``out`` (int64[2], device)."""
        torch = self.torch
        if nbytes == 0:
            out.zero_()
            return
        whole = nbytes // _WORD * _WORD
        if whole == nbytes and int(data.data_ptr()) % _WORD == 0:
            words = data[:nbytes].view(torch.int64)
        else:  # a ragged or unaligned payload (a codec's): its words through a zero-padded copy
            padded = torch.zeros(-(-nbytes // _WORD) * _WORD, dtype=torch.uint8, device=data.device)
            padded[:nbytes].copy_(data[:nbytes])
            words = padded.view(torch.int64)
        out[0] = words.sum()
        out[1] = (words * self._word_weights(words.numel(), data.device)).sum()

    def sums_many(self, data: Any, sizes: list[int], out: Any) -> None:
        """Queue fletcher64's sums of consecutive pieces of ``data`` (``sizes`` bytes each, back to back) into
        ``out`` (int64[len(sizes), 2], device): pieces of one word-aligned size reduce together, two kernels for
        the lot, instead of two for each."""
        i = 0
        offset = 0
        while i < len(sizes):
            nbytes = sizes[i]
            k = 1
            while i + k < len(sizes) and sizes[i + k] == nbytes:
                k += 1
            if k == 1 or nbytes % _WORD or nbytes == 0 or (int(data.data_ptr()) + offset) % _WORD:
                for j in range(k):
                    self.sums(data[offset + j * nbytes :], nbytes, out[i + j])
            else:
                count = nbytes // _WORD
                words = data[offset : offset + k * nbytes].view(self.torch.int64).view(k, count)
                out[i : i + k, 0] = words.sum(1)
                out[i : i + k, 1] = (words * self._word_weights(count, data.device)).sum(1)
            i += k
            offset += k * nbytes

    def _word_weights(self, count: int, device: Any) -> Any:
        if self._weights is None or self._weights.numel() < count:
            self._weights = self.torch.arange(1, max(count, 1 << 16) + 1, dtype=self.torch.int64, device=device)
        return self._weights[:count]

    # ---- staging ------------------------------------------------------------------------------------

    def device_staging(self, nbytes: int) -> Any:
        while self._device_free:
            buf = self._device_free.pop()
            if buf.numel() >= nbytes:
                return buf
        return self.runtime.device_buffer(max(nbytes, 1 << 16))

    def host_staging(self, nbytes: int) -> Any:
        while self._host_free:
            buf = self._host_free.pop()
            if buf.numel() >= nbytes:
                return buf
        return self.runtime.host_buffer(max(nbytes, 1 << 16))

    def release(self, *buffers: Any) -> None:
        for buf in buffers:
            if buf is None:
                continue
            (self._host_free if buf.device.type == "cpu" and self.runtime.device.type != "cpu" else self._device_free).append(buf)

    # ---- a chunk, sending side ----------------------------------------------------------------------

    def _report(self) -> Any:
        """A small host int64 tensor the device writes sums and flags into (pinned for CUDA)."""
        if self._reports:
            return self._reports.pop()
        return self.runtime.host_buffer(32).view(self.torch.int64)

    async def _read(self, result: Any, flag: Any = None) -> tuple[int, int, bool]:
        """Queue ``result`` (device int64[2]) and ``flag`` (device bool[1]) to the host, await the stream, read them."""
        torch, runtime = self.torch, self.runtime
        on_host = runtime.device.type == "cpu"
        with runtime.stream():
            report = None if on_host else self._report()
            if report is not None:
                report[:2].copy_(result, non_blocking=True)
                if flag is not None:
                    report[2:3].copy_(flag.to(torch.int64), non_blocking=True)
            event = runtime.record()
        await wait(event.query)
        source = result if report is None else report[:2]
        s1, s2 = source.tolist()
        ok = True
        if flag is not None:
            ok = bool(flag[0].item()) if report is None else bool(report[2].item())
        if report is not None:
            self._reports.append(report)
        return int(s1), int(s2), ok

    async def outgoing(
        self, table: ChunkTable, seq: int, codec: ChunkCodec | None, checksum: bool, to_host: bool
    ) -> tuple[Any, int, list[Any]]:
        """Chunk ``seq`` in its wire form: ``(payload, checksum, buffers to release after the send)``. The payload
        is a device tensor, or with ``to_host`` a host byte tensor (pinned): only the wire form crosses."""
        torch, runtime = self.torch, self.runtime
        rows = self.rows(table, "src")
        nbytes = int(table.chunk_nbytes[seq])
        held: list[Any] = []
        finite = None
        with runtime.stream():
            gathered = self.device_staging(nbytes)
            held.append(gathered)
            self.gather(rows, seq, gathered)
            wire, size = gathered, nbytes
            if codec is not None:
                size = codec.wire_nbytes(nbytes)
                wire = self.device_staging(size)
                held.append(wire)
                finite = torch.empty(1, dtype=torch.bool, device=gathered.device)  # encode_tensor sets it
                codec.encode_tensor(gathered[:nbytes], wire, finite)
            result = torch.empty(2, dtype=torch.int64, device=gathered.device)  # sums write it (unread without)
            if checksum:
                self.sums(wire, size, result)
            payload = wire[:size]
            if to_host and runtime.device.type != "cpu":
                host = self.host_staging(size)
                held.append(host)
                host[:size].copy_(payload, non_blocking=True)
                payload = host[:size]
        s1, s2, ok = await self._read(result, finite)
        if not ok:
            self.release(*held)
            raise ProtocolError("cannot quantise KV holding inf or NaN: send it unquantised")
        return payload, combine(s1, s2, size) if checksum else 0, held

    # ---- a chunk, receiving side --------------------------------------------------------------------

    def incoming_buffer(self, nbytes: int, on_device: bool) -> Any:
        """Where a chunk's payload lands: a device byte tensor, or (staged) a host one."""
        if on_device or self.runtime.device.type == "cpu":
            return self.device_staging(nbytes)
        return self.host_staging(nbytes)

    async def land(
        self,
        table: ChunkTable,
        seq: int,
        payload: Any,
        nbytes: int,
        codec: ChunkCodec | None,
        expected: int | None,
        verify_first: bool,
    ) -> bool:
        """Put a received chunk (``payload``: its ``nbytes`` wire bytes, a buffer from :meth:`incoming_buffer`) in
        its pages: on the device, checksummed there against ``expected`` (``None``: unchecked), decoded there.
        With ``verify_first`` nothing reaches the KV cache before the checksum matched. False: it did not."""
        torch, runtime = self.torch, self.runtime
        rows = self.rows(table, "dst")
        stored = int(table.chunk_nbytes[seq])
        held = [payload]
        try:
            with runtime.stream():
                data = payload
                if payload.device != self.segments[0].device:  # staged: up to the device first
                    data = self.device_staging(nbytes)
                    held.append(data)
                    data[:nbytes].copy_(payload[:nbytes], non_blocking=True)
                result = torch.empty(2, dtype=torch.int64, device=data.device)
                if expected is not None:
                    self.sums(data, nbytes, result)
            if verify_first and expected is not None:
                s1, s2, _ = await self._read(result)
                if combine(s1, s2, nbytes) != expected:
                    return False
                expected = None
            with runtime.stream():
                if codec is not None:
                    plain = self.device_staging(stored)
                    held.append(plain)
                    codec.decode_tensor(data[:nbytes], stored, plain)
                    data = plain
                self.scatter(rows, seq, data)
            s1, s2, _ = await self._read(result)
            return expected is None or combine(s1, s2, nbytes) == expected
        finally:
            self.release(*held)

    async def checksum_pages(self, table: ChunkTable, seq: int, side: str = "dst") -> int:
        """The checksum of chunk ``seq``'s pages in this memory as they are now."""
        rows = self.rows(table, side)
        nbytes = int(table.chunk_nbytes[seq])
        with self.runtime.stream():
            buf = self.device_staging(nbytes)
            self.gather(rows, seq, buf)
            result = self.torch.empty(2, dtype=self.torch.int64, device=buf.device)
            self.sums(buf, nbytes, result)
        try:
            s1, s2, _ = await self._read(result)
        finally:
            self.release(buf)
        return combine(s1, s2, nbytes)


def check_device_buffers(buffers: list[Any], expected: int) -> str:
    """The device this KV cache lives on (``cuda:N``); a ConfigError for buffers that are not one KV cache."""
    devices = {str(buf.device) for buf in buffers}
    if len(devices) != 1:
        raise ConfigError(f"buffers live on devices {sorted(devices)}; register one device per KV cache")
    for i, buf in enumerate(buffers):
        if not buf.is_contiguous():
            raise ConfigError(f"buffer {i} (shape {tuple(buf.shape)}) is not contiguous; register contiguous tensors")
        nbytes = buf.numel() * buf.element_size()
        if nbytes != expected:
            raise ConfigError(f"buffer {i} holds {nbytes} bytes but needs {expected} per buffer ({len(buffers)} buffer(s))")
    return devices.pop()
