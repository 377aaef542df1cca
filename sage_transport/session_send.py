"""A session's send path: chunks sent through the transport, or placed straight into the peer's memory."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from typing import Any

import msgspec
import numpy as np

from . import kernels
from .chunk_copies import _encode, _gather, _place
from .errors import ProtocolError
from .session_device import DevicePath
from .session_state import _DEVICE_PLACE_BATCH_BYTES, _INLINE_PLACE_BYTES, _PLACE_BATCH_BYTES
from .transfers import Outgoing, TransferStatus
from .wire import (
    Chunk,
    Placed,
    encode_message,
)


class SendPath(DevicePath):
    """Sending one chunk (gathered, encoded or as it lies) and placement jobs (batched, inline or on a worker)."""

    async def _send_chunk(self, out: Outgoing, seq: int) -> None:
        if self.host.device is not None:  # device KV: gathered (and encoded, checksummed) on the device
            await self._send_device_chunk(out, seq)
            return
        lists = out.lists
        ptr, piece_len = lists.piece_ptr, lists.piece_len
        src_seg, src_off = lists.src_seg, lists.src_off
        views = self.host.views
        first, last = ptr[seq], ptr[seq + 1]
        staging = None
        codec_buffers = None
        value: int | None = None
        payload: Any
        checksum = out.checksum
        if out.codec is not None:  # quantise / compress in a worker thread while the loop keeps other chunks moving
            codec_buffers = self._encode_buffers(out)
            self._encoding += 1
            try:
                payload, value = await asyncio.get_running_loop().run_in_executor(
                    self.host.worker_pool(), _encode, out.codec, views, lists, first, last, codec_buffers, checksum
                )
            except ProtocolError as exc:  # this transfer's data cannot take the codec (inf, NaN): fail it, not the peer
                self._encode_free.append(codec_buffers)
                err = ProtocolError(f"transfer {out.plan.transfer_id}, chunk {seq}: {exc}")
                self.host.fail_outgoing(out, err, notify=True)
                return
            finally:
                self._encoding -= 1
            if out.future.done():  # failed or cancelled while this chunk was encoded: nothing to send
                self._encode_free.append(codec_buffers)
                return
            out.wire_bytes[seq] = payload.nbytes  # type: ignore[index]
        elif last - first == 1:
            offset = src_off[first]
            payload = views[src_seg[first]][offset : offset + piece_len[first]]
        elif (
            self.conn.gathers and kernels.ready() and (checksum is None or (self._fused_place and checksum is self.host.checksum))
        ):
            # the connection sends the pages from where they lie (sendmsg): no staging copy; xxh3 over them as one
            table = out.table
            if checksum is not None:
                addr = self.host.bases[table.src_seg[first:last]] + table.src_off[first:last].astype(np.uint64)
                value = kernels.hash_pages(addr, table.piece_len[first:last])
            payload = [views[src_seg[k]][src_off[k] : src_off[k] + piece_len[k]] for k in range(first, last)]
        else:
            nbytes = out.lists.chunk_nbytes[seq]
            staging = self._staging_free.pop() if self._staging_free else memoryview(bytearray(0))
            if staging.nbytes < nbytes:
                staging = memoryview(bytearray(max(nbytes, out.table.max_chunk_bytes)))
            payload = staging[:nbytes]
            if kernels.ready():  # gather (and checksum, xxh3) in one compiled pass
                table = out.table
                addr = self.host.bases[table.src_seg[first:last]] + table.src_off[first:last].astype(np.uint64)
                hashes = 1 if self._fused_place and checksum is self.host.checksum else 0  # xxh3 in the gather
                value = _gather(addr, table.piece_len[first:last], payload, hashes)
            else:
                pos = 0
                for k in range(first, last):
                    n, offset = piece_len[k], src_off[k]
                    staging[pos : pos + n] = views[src_seg[k]][offset : offset + n]
                    pos += n
        if codec_buffers is None and value is None:
            value = checksum(payload) if checksum else 0
        attempt = out.attempts[seq]
        if attempt < 255:
            out.attempts[seq] = attempt + 1
        if out.announce is not None:  # the transfer's only chunk, first copy: its announcement is the header
            header = encode_message(msgspec.structs.replace(out.announce, inline_checksum=value or 0))
            out.announce = None
        else:
            header = encode_message(Chunk(out.wire_id, seq, attempt, value or 0))
        if not out.first_send_at:
            out.first_send_at = asyncio.get_running_loop().time()
            out.status = TransferStatus.RUNNING
        sent_at = out.sent_at
        tracer = self.host.tracer
        if sent_at is not None or tracer is not None:
            started = time.perf_counter()
            if sent_at is not None:
                sent_at[seq] = started
        if not self.lanes or not out.accepted:
            await self.conn.send(header, payload)
        else:
            await self._send_on_lane(header, payload)
        if staging is not None:  # only after a completed send: a cancelled one may still be reading it
            self._staging_free.append(staging)
        if codec_buffers is not None:
            self._encode_free.append(codec_buffers)
        if tracer is not None:
            tracer.sent(self.peer, out.plan.transfer_id, seq, started, time.perf_counter())
        nbytes = out.lists.chunk_nbytes[seq] if type(payload) is list else payload.nbytes
        out.bytes_sent += nbytes
        self.count_sent(1, nbytes)

    def _hash_pages_is(self, checksum: Any) -> bool:
        """Whether ``checksum`` is the channel's xxh3, which the compiled loops compute over pages where they lie."""
        return self._fused_place and checksum is self.host.checksum

    async def _send_on_lane(self, header: bytes, payload: Any) -> None:
        """Send a chunk on the least busy of the session's connections (its own and its lanes). Only chunks of
        transfers the peer has acknowledged a chunk of come here: it knows them whichever connection they take."""
        busy = self._lane_busy
        count = len(busy)
        index = turn = self._lane_turn  # ties go round: connections whose sends all finished at once share evenly
        for k in range(1, count):
            other = (turn + k) % count
            if busy[other] < busy[index]:
                index = other
        self._lane_turn = (index + 1) % count
        busy[index] += 1
        try:
            await (self.conn if index == 0 else self.lanes[index - 1]).send(header, payload)
        finally:
            busy[index] -= 1

    def _encode_buffers(self, out: Outgoing) -> tuple[memoryview, memoryview]:
        codec, largest = out.codec, out.table.max_chunk_bytes
        assert codec is not None
        need = codec.staging_bytes(largest)
        while self._encode_free:
            pair = self._encode_free.pop()
            if pair[0].nbytes >= largest and pair[1].nbytes >= need:
                return pair
        return memoryview(bytearray(largest)), memoryview(bytearray(need))

    def _release_unaccepted(self) -> None:
        """Chunks held for their transfer's acceptance: placed once it came, sent if placement went away, dropped
        when the transfer ended or the chunk left flight meanwhile (resent after a timeout: picked again)."""
        scheduler = self.host.scheduler
        keep: list[tuple[Outgoing, int]] = []
        ready: dict[Outgoing, list[int]] = {}
        for out, seq in self._unaccepted:
            if out.stopped or not scheduler.is_inflight(out, seq):
                continue
            if self.placer is None:
                task = asyncio.ensure_future(self._send_chunk(out, seq))
                self._sends.add(task)
                task.add_done_callback(self._chunk_sent)
            elif out.accepted:
                ready.setdefault(out, []).append(seq)
            else:
                keep.append((out, seq))
        self._unaccepted = keep
        for out, seqs in ready.items():
            pending = iter(seqs)
            following = functools.partial(next, pending, None)
            for seq in pending:
                self._start_placement(out, _batch_of(out.lists.chunk_nbytes, seq, following, self._place_batch_bytes))

    def _placement_batch(self, out: Outgoing, seq: int) -> list[int]:
        """``seq`` and the chunks of the same transfer the scheduler gives next, up to :data:`_PLACE_BATCH_BYTES`
        (:data:`_DEVICE_PLACE_BATCH_BYTES` for device KV): one job writes them all, so the loop's round trip (a
        worker's, or a device event's) is paid once per batch."""
        scheduler = self.host.scheduler

        def next_of_out() -> int | None:
            pick = scheduler.next_for(self.peer)
            if pick is not None and pick[0] is not out:  # another transfer's: it goes next, on its own
                self._held_pick, pick = pick, None
            return None if pick is None else pick[1]

        return _batch_of(out.lists.chunk_nbytes, seq, next_of_out, self._place_batch_bytes)

    @property
    def _place_batch_bytes(self) -> int:
        return _DEVICE_PLACE_BATCH_BYTES if self.host.device is not None else _PLACE_BATCH_BYTES

    def _start_placement(self, out: Outgoing, seqs: list[int]) -> None:
        attempts = []
        for seq in seqs:
            attempt = out.attempts[seq]
            if attempt < 255:
                out.attempts[seq] = attempt + 1
            attempts.append(attempt)
        if not out.first_send_at:
            out.first_send_at = asyncio.get_running_loop().time()
            out.status = TransferStatus.RUNNING
        if out.sent_at is not None or self.host.tracer is not None:
            started = time.perf_counter()
            for seq in seqs:
                if out.sent_at is not None:
                    out.sent_at[seq] = started
                if self.host.tracer is not None:
                    self.host.tracer.sent(self.peer, out.plan.transfer_id, seq, started, started)
        if self.host.device is not None:  # into the peer's device KV, on the device: copies awaited by an event
            self._placing += 1
            out.placing += 1
            placer: Any = self.placer
            task = asyncio.ensure_future(placer.place(out.table, seqs, out.checksum is not None, lambda: out.stopped))
            task.add_done_callback(lambda f: self._placement_done(out, seqs, attempts, f))
            return
        assert self._placement_pool is not None and self.placer is not None
        args = (self.placer, out, seqs, self.host.views, self.host.checksum_pieces, self._fused_place)
        self._placing += 1
        out.placing += 1
        sizes = out.lists.chunk_nbytes
        # a few pages: copying on the loop beats a thread hop (not while the loops compile: a worker waits for that)
        if sum(sizes[seq] for seq in seqs) <= _INLINE_PLACE_BYTES and (not self._fused_place or kernels.ready()):
            try:
                results = _place(*args)
            except Exception as exc:  # handled as a worker's failure would be
                self._placed(out, seqs, attempts, None, exc)
            else:
                self._placed(out, seqs, attempts, results, None)
            return
        future = asyncio.get_running_loop().run_in_executor(self._placement_pool, _place, *args)
        future.add_done_callback(lambda f: self._placement_done(out, seqs, attempts, f))

    def _placement_done(
        self, out: Outgoing, seqs: list[int], attempts: list[int], future: asyncio.Future[list[tuple[int, int | None]]]
    ) -> None:
        if future.cancelled():
            self._placed(out, seqs, attempts, None, None)
        elif future.exception() is not None:
            self._placed(out, seqs, attempts, None, future.exception())
        else:
            self._placed(out, seqs, attempts, future.result(), None)

    def _placed(
        self,
        out: Outgoing,
        seqs: list[int],
        attempts: list[int],
        results: list[tuple[int, int | None]] | None,
        exc: BaseException | None,
    ) -> None:
        """A placement job ended: with its per-chunk checksums, with ``exc``, or neither (cancelled)."""
        self._placing -= 1
        out.placing -= 1
        self.wake.set()
        if out.placing == 0 and out.fence_pending is not None:  # the transfer is over and no write of it runs
            message, out.fence_pending = out.fence_pending, None
            self.post(message)
        if self.closed or out.stopped or (results is None and exc is None):
            return
        scheduler = self.host.scheduler
        if exc is not None:  # fall back to sending the bytes; the chunks go again
            close_placer = getattr(self.placer, "close", None)
            if close_placer is not None:
                close_placer()
            self.placer = None
            scheduler.widen(self.peer, 1)
            self.host.placement_failed(self, exc)
            if any([scheduler.resend(out, seq) for seq in seqs]):
                self.wake.set()
            return
        sizes = out.lists.chunk_nbytes
        nbytes = 0
        assert results is not None
        for seq, attempt, (value, landed) in zip(seqs, attempts, results):
            self.post(Placed(out.wire_id, seq, attempt, value, landed))
            nbytes += sizes[seq]
        out.bytes_sent += nbytes
        self.host.counters["chunks_placed"] += len(seqs)
        self.count_sent(len(seqs), nbytes)


def _batch_of(sizes: list[int], seq: int, more: Callable[[], int | None], limit: int) -> list[int]:
    """``seq`` and the chunks ``more()`` gives (until None) while their bytes stay under ``limit``."""
    seqs, nbytes = [seq], sizes[seq]
    while nbytes < limit and (following := more()) is not None:
        seqs.append(following)
        nbytes += sizes[following]
    return seqs
