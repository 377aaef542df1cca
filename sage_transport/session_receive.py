"""A session's receive path: frames read, chunks verified and put in place, acknowledgements batched."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import numpy as np

from . import kernels
from .chunk_copies import _scatter
from .errors import ProtocolError
from .session_device import DevicePath
from .session_state import _YIELD_EVERY, ReadSlot
from .transfers import Incoming
from .wire import (
    Ack,
    Announce,
    Chunk,
    Nack,
    Placed,
    RegionUpdate,
    decode_message,
)

# where the payload of the frame being read goes (``_sink`` decides, ``_on_chunk`` acts on it); module constants,
# not an enum: compared once per chunk
IN_PLACE = 0  # straight into its one destination page (zero-copy)
STAGED = 1  # into staging, then scattered to its pages
DUPLICATE = 2  # a chunk already verified: discarded, acknowledged again
ENCODED = 3  # a codec's wire form: verified, then decoded into its pages on a worker
BEING_DECODED = 4  # a copy of a chunk whose decode is running: discarded, its acknowledgement follows the decode
ON_DEVICE = 5  # device KV: into device (or pinned) staging, then verified, decoded and scattered on the device
IN_PIECES = 6  # straight into its several destination pages (a connection that scatters), verified where it landed


class ReceivePath(DevicePath):
    """Where each incoming chunk lands, how it is verified, and what is acknowledged."""

    def _sink(self, header: bytes, nbytes: int) -> Any:
        return self._sink_into(self._slot, header, nbytes)

    def _sink_into(self, slot: ReadSlot, header: bytes, nbytes: int) -> Any:
        msg = slot.decoded = decode_message(header)
        if type(msg) is not Chunk:
            if slot.lane:
                raise ProtocolError(f"{type(msg).__name__} from {self.peer} on an extra connection, which carries chunks only")
            if type(msg) is not Announce or msg.inline_checksum is None:
                raise ProtocolError(f"{type(msg).__name__} from {self.peer} carried a {nbytes}-byte payload")
            self.host.on_control(self, msg)  # taken (or refused) first; the payload is its chunk 0, first copy
            msg = slot.decoded = Chunk(msg.wire_id, 0, 0, msg.inline_checksum)
        inc = self.incoming.get(msg.wire_id)
        if inc is None:  # a transfer already over (its chunks still in flight): discard, within what it could send
            if msg.wire_id > self.max_wire_id_in or nbytes > self.max_incoming_chunk:
                raise ProtocolError(
                    f"a {nbytes}-byte chunk of transfer {msg.wire_id} from {self.peer}, which it never announced "
                    f"(or larger than any chunk it announced: {self.max_incoming_chunk} bytes)"
                )
            slot.kind = DUPLICATE
            return self._staging(slot, nbytes)
        lists = inc.lists
        seq = msg.seq
        if seq >= len(inc.verified):
            raise ProtocolError(f"chunk {seq} of transfer {inc.transfer_id} from {self.peer}: only {len(inc.verified)} chunks")
        if inc.verified[seq]:  # a duplicate: re-acknowledged, its bytes discarded (no larger than the chunk)
            stored = lists.chunk_nbytes[seq]
            if nbytes > (inc.codec.bound(stored) if inc.codec is not None else stored):
                raise ProtocolError(
                    f"chunk {seq} of transfer {inc.transfer_id} from {self.peer} came again with {nbytes} bytes, "
                    f"more than its {stored}"
                )
            slot.kind = DUPLICATE
            return self._staging(slot, nbytes)
        if inc.codec is not None:
            stored = lists.chunk_nbytes[seq]
            if seq in inc.decoding and nbytes <= inc.codec.bound(stored):  # a copy is being decoded: its ack follows
                slot.kind = BEING_DECODED
                return self._staging(slot, nbytes)
            if not 0 < nbytes <= inc.codec.bound(stored):
                raise ProtocolError(
                    f"chunk {seq} of transfer {inc.transfer_id} from {self.peer} has {nbytes} bytes on the wire, "
                    f"more than {inc.codec.name} takes for {stored} bytes"
                )
            if self.host.device is not None:
                slot.kind = ON_DEVICE
                return self._device_target(nbytes)
            slot.kind = ENCODED
            pair = slot.decode_in = self._decode_buffers(inc)
            return pair[1][:nbytes]
        if lists.chunk_nbytes[seq] != nbytes:
            raise ProtocolError(
                f"chunk {seq} of transfer {inc.transfer_id} from {self.peer} has {nbytes} bytes, "
                f"expected {lists.chunk_nbytes[seq]}"
            )
        if self.host.device is not None:
            if seq in inc.decoding:  # a copy is landing on the device: its acknowledgement follows
                slot.kind = BEING_DECODED
                return self._staging(slot, nbytes)
            slot.kind = ON_DEVICE
            return self._device_target(nbytes)
        first = lists.piece_ptr[seq]
        if lists.piece_ptr[seq + 1] - first == 1 and self._zero_copy:
            slot.kind = IN_PLACE
            offset = lists.dst_off[first]
            if self.lanes:  # the transfer does not end while this lands in its pages (another connection's copy
                inc.landing += 1  # may verify first)
                slot.landing = inc
            return self.host.views[lists.dst_seg[first]][offset : offset + nbytes]
        if slot.scatters and self._zero_copy and (inc.checksum is None or inc.hash_in_place or inc.checksum_pieces is not None):
            slot.kind = IN_PIECES
            if self.lanes:
                inc.landing += 1
                slot.landing = inc
            views, dst_seg, dst_off, piece_len = self.host.views, lists.dst_seg, lists.dst_off, lists.piece_len
            return [views[dst_seg[k]][dst_off[k] : dst_off[k] + piece_len[k]] for k in range(first, lists.piece_ptr[seq + 1])]
        slot.kind = STAGED
        return self._staging(slot, nbytes)

    def _decode_buffers(self, inc: Incoming) -> tuple[memoryview, memoryview]:
        codec, largest = inc.codec, inc.table.max_chunk_bytes
        assert codec is not None
        scratch, wire = largest + codec.wire_nbytes(largest), codec.bound(largest)
        while self._decode_free:
            pair = self._decode_free.pop()
            if pair[0].nbytes >= scratch and pair[1].nbytes >= wire:
                return pair
        return memoryview(bytearray(scratch)), memoryview(bytearray(wire))

    def _staging(self, slot: ReadSlot, nbytes: int) -> memoryview:
        if slot.staging.nbytes < nbytes:
            slot.staging = memoryview(bytearray(nbytes))
        return slot.staging[:nbytes]

    async def _reader(self) -> None:
        conn, slot = self.conn, self._slot
        sink = self._sink
        count = 0
        try:
            while True:
                slot.decoded = None
                frame = await conn.recv(sink)
                if frame.payload is not None:
                    self._on_chunk(slot, frame.payload)
                else:
                    self._dispatch(decode_message(frame.header))
                count += 1
                if count % _YIELD_EVERY == 0:
                    await asyncio.sleep(0)
                while self._decoding >= max(2, self._send_limit):  # decodes in flight hold staging: take no more frames
                    self._decode_done.clear()
                    await self._decode_done.wait()
        finally:
            await self._release_landing(conn, slot)

    async def _release_landing(self, conn: Any, slot: ReadSlot) -> None:
        """A reader cut short (the session ends) while a payload landed in a transfer's pages (with lanes): once
        the connection is closed nothing more is written there, so the transfer may end now."""
        if slot.landing is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(conn.aclose())
            self._landed(slot)

    def _landed(self, slot: ReadSlot) -> None:
        inc, slot.landing = slot.landing, None
        if inc is not None:
            inc.landing -= 1
            if not inc.landing and inc.finish is not None:
                self.host.landed(inc)

    def _on_chunk(self, slot: ReadSlot, payload: memoryview) -> None:
        msg = slot.decoded
        if slot.landing is not None:
            self._landed(slot)
        inc = self.incoming.get(msg.wire_id)
        if inc is None:
            return  # aborted or unknown: the payload went to scratch
        seq = msg.seq
        counters = self.host.counters
        kind = slot.kind
        if kind != DUPLICATE and kind != BEING_DECODED and inc.verified[seq]:  # another lane's copy came first
            kind = DUPLICATE
            if slot.decode_in is not None:
                self._decode_free.append(slot.decode_in)
                slot.decode_in = None
        if kind == DUPLICATE or kind == BEING_DECODED:
            counters["duplicates"] += 1
            if kind == DUPLICATE:
                inc.pending_acks.append(seq)  # re-acknowledge: the sender may have resent after a timeout
                self._schedule_ack_flush(inc)
            return
        if kind == IN_PIECES:  # landed in its pages: verified there
            self.count_received(inc.lists.chunk_nbytes[seq])
            if inc.checksum is not None and self._checksum_in_place(inc, seq) != msg.checksum:
                counters["checksum_failures"] += 1
                inc.bad_chunks += 1
                self.post(Nack(inc.wire_id, seq, msg.attempt, "checksum mismatch"))
                return
            if self.host.tracer is not None:
                now = time.perf_counter()
                self.host.tracer.received(self.peer, inc.transfer_id, seq, now, now)
            self._accept(inc, seq)
            return
        self.count_received(payload.nbytes)
        if kind == ON_DEVICE:
            self._start_device_land(inc, seq, payload.nbytes, msg)
            return
        tracer = self.host.tracer
        arrived = time.perf_counter() if tracer is not None else 0.0
        decode_buffers, slot.decode_in = slot.decode_in, None
        if kind == STAGED and kernels.ready():  # staging → its pages in one compiled pass (verified first, or fused)
            if self._scatter(inc, seq, payload, msg):
                if tracer is not None:
                    tracer.received(self.peer, inc.transfer_id, seq, arrived, time.perf_counter())
                self._accept(inc, seq)
            return
        if inc.checksum is not None and inc.checksum(payload) != msg.checksum:
            counters["checksum_failures"] += 1
            inc.bad_chunks += 1
            if decode_buffers is not None:
                self._decode_free.append(decode_buffers)
            self.post(Nack(inc.wire_id, seq, msg.attempt, "checksum mismatch"))
            return
        if kind == ENCODED:
            assert decode_buffers is not None
            self._start_decode(inc, seq, payload, decode_buffers, arrived)
            return
        if kind == STAGED:
            lists = inc.lists
            views, dst_seg, dst_off, piece_len = (
                self.host.views,
                lists.dst_seg,
                lists.dst_off,
                lists.piece_len,
            )
            pos = 0
            for k in range(lists.piece_ptr[seq], lists.piece_ptr[seq + 1]):
                n, offset = piece_len[k], dst_off[k]
                views[dst_seg[k]][offset : offset + n] = payload[pos : pos + n]
                pos += n
        if tracer is not None:
            tracer.received(self.peer, inc.transfer_id, seq, arrived, time.perf_counter())
        self._accept(inc, seq)

    def _scatter(self, inc: Incoming, seq: int, payload: memoryview, msg: Chunk) -> bool:
        """Copy a staged chunk to its destination pages; False (and a Nack) when its checksum is wrong. With
        zero-copy on (chunks may land in place unverified anyway), the copy checksums as it goes; with it off, the
        payload is verified before any byte reaches the KV cache."""
        table = inc.table
        ptr = inc.lists.piece_ptr
        first, last = ptr[seq], ptr[seq + 1]
        lengths = table.piece_len[first:last]
        dst = self.host.bases[table.dst_seg[first:last]] + table.dst_off[first:last].astype(np.uint64)
        fused = inc.hash_in_place and self._zero_copy
        expected = msg.checksum
        if inc.checksum is not None and not fused and inc.checksum(payload) != expected:
            value = -1
        else:
            value = _scatter(payload, dst, lengths, 1 if fused else 0)
            if not fused:
                value = expected
        if inc.checksum is not None and value != expected:
            self.host.counters["checksum_failures"] += 1
            inc.bad_chunks += 1
            self.post(Nack(inc.wire_id, seq, msg.attempt, "checksum mismatch"))
            return False
        return True

    def _start_decode(
        self, inc: Incoming, seq: int, payload: memoryview, buffers: tuple[memoryview, memoryview], arrived: float
    ) -> None:
        """Dequantise / decompress a verified payload into its destination in a worker thread; ack once done."""
        lists, views = inc.lists, self.host.views
        dst_seg, dst_off, piece_len = lists.dst_seg, lists.dst_off, lists.piece_len
        targets = [
            views[dst_seg[k]][dst_off[k] : dst_off[k] + piece_len[k]]
            for k in range(lists.piece_ptr[seq], lists.piece_ptr[seq + 1])
        ]
        codec = inc.codec
        assert codec is not None
        inc.decoding.add(seq)
        self._decoding += 1
        future = asyncio.get_running_loop().run_in_executor(
            self.host.worker_pool(), codec.decode, payload, lists.chunk_nbytes[seq], targets, buffers[0]
        )
        future.add_done_callback(lambda f: self._decoded_chunk(inc, seq, payload.nbytes, buffers, arrived, f))

    def _decoded_chunk(
        self,
        inc: Incoming,
        seq: int,
        size: int,
        buffers: tuple[memoryview, memoryview],
        arrived: float,
        future: asyncio.Future[None],
    ) -> None:
        self._decoding -= 1
        self._decode_free.append(buffers)
        inc.decoding.discard(seq)
        self._decode_done.set()
        if self.closed or future.cancelled() or self.incoming.get(inc.wire_id) is not inc:
            return
        exc = future.exception()
        if exc is not None:
            name = inc.codec.name if inc.codec is not None else "?"
            err = ProtocolError(f"chunk {seq} of transfer {inc.transfer_id} from {self.peer} does not decode as {name}: {exc}")
            self.host.fail_incoming(self, inc, err, notify=True)
            return
        inc.wire_bytes += size
        tracer = self.host.tracer
        if tracer is not None:
            tracer.received(self.peer, inc.transfer_id, seq, arrived, time.perf_counter())
        self._accept(inc, seq)

    def _on_placed(self, msg: Placed) -> None:
        if not self.window_offered:
            raise ProtocolError(f"{self.peer} claims to have written our memory, which we never offered")
        inc = self.incoming.get(msg.wire_id)
        if inc is None:
            return
        seq = msg.seq
        if seq >= len(inc.verified):
            raise ProtocolError(f"placed chunk {seq} of transfer {inc.transfer_id} from {self.peer}: only {len(inc.verified)}")
        counters = self.host.counters
        if inc.verified[seq] or seq in inc.decoding:  # again, or again while its check runs on the device
            counters["duplicates"] += 1
            inc.pending_acks.append(seq)
            self._schedule_ack_flush(inc)
            return
        lists = inc.lists
        self.count_received(lists.chunk_nbytes[seq])
        tracer = self.host.tracer
        arrived = time.perf_counter() if tracer is not None else 0.0
        if inc.checksum_pieces is not None:
            if msg.landed is not None and self._trust_writer:  # the writer read where it wrote (verify_placed)
                value = msg.landed
            elif self.host.device is not None:  # read where it landed, on the device
                self._verify_placed_on_device(inc, msg)
                return
            else:
                value = self._checksum_in_place(inc, seq)
            if value != msg.checksum:
                counters["checksum_failures"] += 1
                inc.bad_chunks += 1
                self.post(Nack(inc.wire_id, seq, msg.attempt, "checksum mismatch (placed)"))
                return
        if tracer is not None:
            tracer.received(self.peer, inc.transfer_id, seq, arrived, time.perf_counter())
        self._accept(inc, seq)

    def _checksum_in_place(self, inc: Incoming, seq: int) -> int:
        """The checksum of chunk ``seq``'s destination pages as they are in our memory now."""
        lists = inc.lists
        first, last = lists.piece_ptr[seq], lists.piece_ptr[seq + 1]
        if inc.hash_in_place:
            table = inc.table
            addr = self.host.bases[table.dst_seg[first:last]] + table.dst_off[first:last].astype("uint64")
            return kernels.hash_pages(addr, table.piece_len[first:last])
        views, dst_seg, dst_off, piece_len = self.host.views, lists.dst_seg, lists.dst_off, lists.piece_len
        assert inc.checksum_pieces is not None
        return int(inc.checksum_pieces([views[dst_seg[k]][dst_off[k] : dst_off[k] + piece_len[k]] for k in range(first, last)]))

    def _accept(self, inc: Incoming, seq: int) -> None:
        """A chunk is in place and verified: record it and acknowledge (batched)."""
        inc.pending_acks.append(seq)
        if inc.mark_verified(seq):
            self._flush_acks(inc)
            self.host.incoming_complete(self, inc)
        elif len(inc.pending_acks) >= inc.ack_every:
            self._flush_acks(inc)
        else:
            self._schedule_ack_flush(inc)

    def _schedule_ack_flush(self, inc: Incoming) -> None:
        if not self._ack_flush_scheduled:
            self._ack_flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_all_acks)

    def _flush_all_acks(self) -> None:
        self._ack_flush_scheduled = False
        for inc in list(self.incoming.values()):
            self._flush_acks(inc)

    def _flush_acks(self, inc: Incoming) -> None:
        if inc.pending_acks:
            self.post(Ack(inc.wire_id, inc.pending_acks))
            inc.pending_acks = []

    def _dispatch(self, msg: Any) -> None:
        kind = type(msg)
        if kind is Placed:
            self._on_placed(msg)
        elif kind is RegionUpdate:
            self.region = msg.region
        else:  # acknowledgements, announcements, aborts, fences, pulls: the channel's (it refuses the unexpected)
            self.host.on_control(self, msg)
