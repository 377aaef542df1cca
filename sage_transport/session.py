"""One connected peer: a writer task (control messages first, then chunks the scheduler picks) and a
reader task (payloads land in place, are verified, acknowledged in batches). This is the hot path:
per chunk it does list lookups, one memoryview slice, one checksum, one small header; no logging."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

import numpy as np

from . import kernels
from .config import Integrity
from .errors import ConnectionClosedError, PeerDeadError, ProtocolError, TransportError
from .placement import ShmWriter, buffer_address
from .transfers import Expectation, Incoming, Outgoing, TransferStatus
from .transports.base import Connection
from .wire import (
    Abort,
    Ack,
    Announce,
    Chunk,
    Fence,
    Nack,
    Placed,
    Pull,
    PullRefused,
    Region,
    RegionUpdate,
    decode_message,
    encode_message,
)

if TYPE_CHECKING:
    import concurrent.futures

    from .attest import PeerIdentity
    from .channel import KVTransferChannel
    from .placement import CmaWriter
    from .wire import Attest
    from .wire_codec import ChunkCodec

__all__ = ["PeerSession"]

_YIELD_EVERY = 64
#: bytes of one transfer's chunks one placement job writes (the loop's round trip is paid per job)
_PLACE_BATCH_BYTES = 16 << 20
#: a placed peer's window is this many times ``prefetch_depth`` (nothing is staged for its chunks)
_PLACED_WINDOW_FACTOR = 4
#: a placement job this small is copied on the loop thread: a worker thread's round trip costs more
_INLINE_PLACE_BYTES = 256 << 10


class PeerSession:
    """State and tasks of one peer connection. Created by the channel after a successful handshake."""

    def __init__(self, channel: KVTransferChannel, conn: Connection, peer: str, region: Region | None) -> None:
        self.channel = channel
        self.conn = conn
        self.peer = peer
        self.region = region
        self.outgoing: dict[int, Outgoing] = {}
        self.incoming: dict[int, Incoming] = {}
        self.pulls: dict[str, Expectation] = {}  # transfers asked of this peer, not yet announced
        self.outbox: collections.deque[bytes] = collections.deque()
        self.wake = asyncio.Event()
        self.closed = False
        self._next_wire_id = 0
        self._staging_free: list[memoryview] = []  # staging buffers for gathered chunks, reused (one per send in flight)
        self._sends: set[asyncio.Task[None]] = set()  # chunk sends in flight (several per peer)
        self._send_limit = channel.config.overlap_streams
        self._staging_in = memoryview(bytearray(0))
        self._decoded: Any = None
        self._target_kind = 0  # 0: in place, 1: staging, 2: discard (re-ack), 3: codec staging, 4: discard (decoding)
        self.peer_codecs: frozenset[str] = frozenset()  # what the peer decodes (from the handshake)
        # codec_policy=auto: stored bytes/s of the last large transfer sent as stored or with each codec
        self.rates: dict[str, float] = {}
        self.auto_choices = 0
        # wire codecs: (stored bytes, wire form) buffer pairs for encodes and decodes in worker threads
        self._encode_free: list[tuple[memoryview, memoryview]] = []
        self._decode_free: list[tuple[memoryview, memoryview]] = []
        self._decode_in: tuple[memoryview, memoryview] | None = None
        self._decoding = 0
        self._encoding = 0
        self._decode_done = asyncio.Event()
        self._ack_flush_scheduled = False
        # zero_copy off: payloads land in staging and reach the KV cache only once verified
        self._zero_copy = channel.config.zero_copy
        self.tasks: list[asyncio.Task[None]] = []
        # who the peer is: kernel-attested process (None: unknown, e.g. another host), and whether it may pull,
        # push and be handed our memory (token proven, or attested as this user on this host)
        self.identity: PeerIdentity | None = None
        self.trusted = False
        self.peer_invite: Attest | None = None  # the peer's attestation socket: where we present a window later
        self.attest_nonce: bytes | None = None  # our invitation's nonce, revoked when the session ends
        self.pull_destinations: dict[str, list[tuple[int, int, tuple[int, ...]]]] = {}  # what our pulls asked for
        # fence: receiver-side aborts of transfers the peer may still be writing directly, until its Fence
        self.fencing: dict[int, tuple[Expectation, BaseException, asyncio.TimerHandle]] = {}
        # incoming chunk sizes the peer may use: the largest chunk (on the wire) of any transfer it announced
        self.max_incoming_chunk = 0
        self.max_wire_id_in = 0
        self.incoming_pages = 0  # pages planned in this peer's open incoming transfers (bounded)
        # direct placement: chunks of accepted transfers are written into the peer's memory by worker threads
        self.window_offered = False
        self.placer: CmaWriter | ShmWriter | None = None
        self._placement_pool: concurrent.futures.Executor | None = None
        self._placing = 0
        self._place_limit = channel.config.overlap_streams + 1  # one job queued behind each copying thread
        # xxh3 placement: copy and checksum (source and landed) in one compiled pass per page
        self._held_pick: tuple[Hashable, int] | None = None  # picked after a placement batch ended: goes next
        self._unaccepted: list[tuple[Outgoing, int]] = []  # large chunks picked before the receiver accepted
        self._fused_place = kernels.AVAILABLE and channel.config.integrity is Integrity.XXH3
        self._trust_writer = channel.config.verify_placed == "writer"
        self.counters: collections.Counter[str] = collections.Counter()  # chunks and bytes, this peer only

    @property
    def placement_kind(self) -> str:
        """``shm`` (memory copy into the peer's shared KV cache), ``cma`` (process_vm_writev) or ``none``."""
        if self.placer is None:
            return "none"
        return "shm" if isinstance(self.placer, ShmWriter) else "cma"

    def set_overlap(self, overlap_streams: int) -> None:
        """Chunk sends (and direct writes) in flight at once for this peer, from now on."""
        self._send_limit = overlap_streams
        self._place_limit = overlap_streams + 1

    def enable_placement(self, placer: CmaWriter | ShmWriter, pool: concurrent.futures.Executor) -> None:
        """Write chunks of accepted transfers straight into the peer's memory from now on."""
        self.placer, self._placement_pool = placer, pool
        self.channel._scheduler.widen(self.peer, _PLACED_WINDOW_FACTOR)
        self.wake.set()

    def start(self) -> None:
        self.tasks = [
            asyncio.create_task(self._run(self._writer()), name=f"sage-writer-{self.peer}"),
            asyncio.create_task(self._run(self._reader()), name=f"sage-reader-{self.peer}"),
        ]

    @property
    def last_wire_id(self) -> int:
        """The highest wire id this side gave a transfer it sends to the peer."""
        return self._next_wire_id

    def new_wire_id(self) -> int:
        self._next_wire_id += 1
        return self._next_wire_id

    def post(self, message: Any) -> None:
        """Queue a control message; the writer sends it before the next chunk."""
        if not self.closed:
            self.outbox.append(encode_message(message))
            self.wake.set()

    async def _run(self, body: Any) -> None:
        try:
            await body
        except asyncio.CancelledError:
            raise
        except (TransportError, ProtocolError) as exc:
            self.channel._session_failed(self, exc)
        except Exception as exc:
            self.channel._counters["internal_errors"] += 1
            self.channel._session_failed(self, TransportError(f"session with {self.peer} crashed: {exc!r}"))
            raise

    # ---- writer -------------------------------------------------------------------------------------

    async def _writer(self) -> None:
        channel, conn, outbox = self.channel, self.conn, self.outbox
        scheduler = channel._scheduler
        while True:
            while outbox:
                await conn.send(outbox.popleft())
            # a codec chunk is encoded before it is sent: two at least, so one encodes while another is on the wire
            limit = max(2, self._send_limit) if self._encoding else self._send_limit
            busy = self._placing >= self._place_limit or len(self._sends) >= limit
            pick = None
            if not busy:
                pick, self._held_pick = self._held_pick or scheduler.next_for(self.peer), None
            if self._unaccepted and not busy:
                self._release_unaccepted()
            if pick is not None:
                out, seq = pick
                if self.placer is not None and out.codec is None:  # type: ignore[attr-defined]
                    if out.accepted:  # type: ignore[attr-defined]
                        self._start_placement(out, self._placement_batch(out, seq))  # type: ignore[arg-type]
                        continue
                    if len(out.table) > 1 and out.lists["chunk_nbytes"][seq] > _INLINE_PLACE_BYTES:  # type: ignore[attr-defined]
                        # the receiver says it took the announcement at once (an empty Ack): wait for that rather
                        # than push large chunks through the transport, then place them (a transfer of one chunk
                        # goes at once: the round trip would cost more than it saves)
                        self._unaccepted.append(pick)  # type: ignore[arg-type]
                        continue
                # several chunks in flight: the next one goes while the transport still moves this one
                task = asyncio.ensure_future(self._send_chunk(out, seq))  # type: ignore[arg-type]
                self._sends.add(task)
                task.add_done_callback(self._chunk_sent)
                continue
            self.wake.clear()
            if outbox:
                continue
            waiting_for_acks = scheduler.inflight(self.peer) > 0
            try:
                # read at every wait: reconfigure(ack_timeout_s=...) applies to live sessions at once
                async with asyncio.timeout(channel.config.ack_timeout_s if waiting_for_acks else None):
                    await self.wake.wait()
            except TimeoutError:
                resent = scheduler.resend_inflight(self.peer)
                channel._counters["resends_after_timeout"] += resent

    def _chunk_sent(self, task: asyncio.Task[None]) -> None:
        self._sends.discard(task)
        self.wake.set()
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None or self.closed:
            return
        if isinstance(exc, (TransportError, ProtocolError)):
            self.channel._session_failed(self, exc)
        else:
            self.channel._session_failed(self, TransportError(f"sending to {self.peer} crashed: {exc!r}"))

    async def _send_chunk(self, out: Outgoing, seq: int) -> None:
        lists = out.lists
        ptr, piece_len = lists["piece_ptr"], lists["piece_len"]
        src_seg, src_off = lists["src_seg"], lists["src_off"]
        views = self.channel._memory_views
        first, last = ptr[seq], ptr[seq + 1]
        staging = None
        codec_buffers = None
        value: int | None = None
        checksum = self.channel._checksum
        if out.codec is not None:  # quantise / compress in a worker thread while the loop keeps other chunks moving
            codec_buffers = self._encode_buffers(out)
            self._encoding += 1
            try:
                payload, value = await asyncio.get_running_loop().run_in_executor(
                    self.channel._worker_pool(), _encode, out.codec, views, lists, first, last, codec_buffers, checksum
                )
            except ProtocolError as exc:  # this transfer's data cannot take the codec (inf, NaN): fail it, not the peer
                self._encode_free.append(codec_buffers)
                err = ProtocolError(f"transfer {out.plan.transfer_id}, chunk {seq}: {exc}")
                self.channel._fail_outgoing(out, err, notify=True)
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
        else:
            nbytes = out.lists["chunk_nbytes"][seq]
            staging = self._staging_free.pop() if self._staging_free else memoryview(bytearray(0))
            if staging.nbytes < nbytes:
                staging = memoryview(bytearray(max(nbytes, out.table.max_chunk_bytes)))
            payload = staging[:nbytes]
            if kernels.AVAILABLE:  # gather (and checksum, xxh3) in one compiled pass
                table = out.table
                addr = self.channel._memory_base[table.src_seg[first:last]] + table.src_off[first:last].astype(np.uint64)
                value = _gather(addr, table.piece_len[first:last], payload, 1 if self._fused_place else 0)
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
        header = encode_message(Chunk(out.wire_id, seq, attempt, value or 0))
        if not out.first_send_at:
            out.first_send_at = asyncio.get_running_loop().time()
            out.status = TransferStatus.RUNNING
        sent_at = out.sent_at
        tracer = self.channel.tracer
        if sent_at is not None or tracer is not None:
            started = time.perf_counter()
            if sent_at is not None:
                sent_at[seq] = started
        await self.conn.send(header, payload)
        if staging is not None:  # only after a completed send: a cancelled one may still be reading it
            self._staging_free.append(staging)
        if codec_buffers is not None:
            self._encode_free.append(codec_buffers)
        if tracer is not None:
            tracer.sent(self.peer, out.plan.transfer_id, seq, started, time.perf_counter())
        nbytes = payload.nbytes
        out.bytes_sent += nbytes
        counters = self.channel._counters
        counters["chunks_sent"] += 1
        counters["bytes_sent"] += nbytes
        mine = self.counters
        mine["chunks_sent"] += 1
        mine["bytes_sent"] += nbytes

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
        scheduler = self.channel._scheduler
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
        sizes_limit = _PLACE_BATCH_BYTES
        for out, seqs in ready.items():
            sizes = out.lists["chunk_nbytes"]
            batch: list[int] = []
            nbytes = 0
            for seq in seqs:
                batch.append(seq)
                nbytes += sizes[seq]
                if nbytes >= sizes_limit:
                    self._start_placement(out, batch)
                    batch, nbytes = [], 0
            if batch:
                self._start_placement(out, batch)

    def _placement_batch(self, out: Outgoing, seq: int) -> list[int]:
        """``seq`` and the chunks of the same transfer the scheduler gives next, up to :data:`_PLACE_BATCH_BYTES`:
        one worker job writes them all, so the loop's round trip per job is paid once per batch."""
        seqs, nbytes, sizes = [seq], 0, out.lists["chunk_nbytes"]
        nbytes = sizes[seq]
        scheduler = self.channel._scheduler
        while nbytes < _PLACE_BATCH_BYTES:
            pick = scheduler.next_for(self.peer)
            if pick is None:
                break
            if pick[0] is not out:
                self._held_pick = pick
                break
            seqs.append(pick[1])
            nbytes += sizes[pick[1]]
        return seqs

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
        if out.sent_at is not None or self.channel.tracer is not None:
            started = time.perf_counter()
            for seq in seqs:
                if out.sent_at is not None:
                    out.sent_at[seq] = started
                if self.channel.tracer is not None:
                    self.channel.tracer.sent(self.peer, out.plan.transfer_id, seq, started, started)
        assert self._placement_pool is not None and self.placer is not None
        args = (self.placer, out, seqs, self.channel._memory_views, self.channel._checksum_pieces, self._fused_place)
        self._placing += 1
        out.placing += 1
        sizes = out.lists["chunk_nbytes"]
        if sum(sizes[seq] for seq in seqs) <= _INLINE_PLACE_BYTES:  # a few pages: copying beats a thread hop
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
        scheduler = self.channel._scheduler
        if exc is not None:  # fall back to sending the bytes; the chunks go again
            self.placer = None
            scheduler.widen(self.peer, 1)
            self.channel._placement_failed(self, exc)
            if any([scheduler.resend(out, seq) for seq in seqs]):
                self.wake.set()
            return
        sizes = out.lists["chunk_nbytes"]
        nbytes = 0
        assert results is not None
        for seq, attempt, (value, landed) in zip(seqs, attempts, results):
            self.post(Placed(out.wire_id, seq, attempt, value, landed))
            nbytes += sizes[seq]
        out.bytes_sent += nbytes
        counters = self.channel._counters
        counters["chunks_sent"] += len(seqs)
        counters["chunks_placed"] += len(seqs)
        counters["bytes_sent"] += nbytes
        mine = self.counters
        mine["chunks_sent"] += len(seqs)
        mine["bytes_sent"] += nbytes

    # ---- reader -------------------------------------------------------------------------------------

    def _sink(self, header: bytes, nbytes: int) -> Any:
        msg = self._decoded = decode_message(header)
        if type(msg) is not Chunk:
            raise ProtocolError(f"{type(msg).__name__} from {self.peer} carried a {nbytes}-byte payload")
        inc = self.incoming.get(msg.wire_id)
        if inc is None:  # a transfer already over (its chunks still in flight): discard, within what it could send
            if msg.wire_id > self.max_wire_id_in or nbytes > self.max_incoming_chunk:
                raise ProtocolError(
                    f"a {nbytes}-byte chunk of transfer {msg.wire_id} from {self.peer}, which it never announced "
                    f"(or larger than any chunk it announced: {self.max_incoming_chunk} bytes)"
                )
            self._target_kind = 2
            return self._staging(nbytes)
        lists = inc.lists
        seq = msg.seq
        if seq >= len(inc.verified):
            raise ProtocolError(f"chunk {seq} of transfer {inc.transfer_id} from {self.peer}: only {len(inc.verified)} chunks")
        if inc.verified[seq]:  # a duplicate: re-acknowledged, its bytes discarded (no larger than the chunk)
            stored = lists["chunk_nbytes"][seq]
            if nbytes > (inc.codec.bound(stored) if inc.codec is not None else stored):
                raise ProtocolError(
                    f"chunk {seq} of transfer {inc.transfer_id} from {self.peer} came again with {nbytes} bytes, "
                    f"more than its {stored}"
                )
            self._target_kind = 2
            return self._staging(nbytes)
        if inc.codec is not None:
            stored = lists["chunk_nbytes"][seq]
            if seq in inc.decoding and nbytes <= inc.codec.bound(stored):  # a copy is being decoded: its ack follows
                self._target_kind = 4
                return self._staging(nbytes)
            if not 0 < nbytes <= inc.codec.bound(stored):
                raise ProtocolError(
                    f"chunk {seq} of transfer {inc.transfer_id} from {self.peer} has {nbytes} bytes on the wire, "
                    f"more than {inc.codec.name} takes for {stored} bytes"
                )
            self._target_kind = 3
            pair = self._decode_in = self._decode_buffers(inc)
            return pair[1][:nbytes]
        if lists["chunk_nbytes"][seq] != nbytes:
            raise ProtocolError(
                f"chunk {seq} of transfer {inc.transfer_id} from {self.peer} has {nbytes} bytes, "
                f"expected {lists['chunk_nbytes'][seq]}"
            )
        first = lists["piece_ptr"][seq]
        if lists["piece_ptr"][seq + 1] - first == 1 and self._zero_copy:
            self._target_kind = 0
            offset = lists["dst_off"][first]
            return self.channel._memory_views[lists["dst_seg"][first]][offset : offset + nbytes]
        self._target_kind = 1
        return self._staging(nbytes)

    def _decode_buffers(self, inc: Incoming) -> tuple[memoryview, memoryview]:
        codec, largest = inc.codec, inc.table.max_chunk_bytes
        assert codec is not None
        scratch, wire = largest + codec.wire_nbytes(largest), codec.bound(largest)
        while self._decode_free:
            pair = self._decode_free.pop()
            if pair[0].nbytes >= scratch and pair[1].nbytes >= wire:
                return pair
        return memoryview(bytearray(scratch)), memoryview(bytearray(wire))

    def _staging(self, nbytes: int) -> memoryview:
        if self._staging_in.nbytes < nbytes:
            self._staging_in = memoryview(bytearray(nbytes))
        return self._staging_in[:nbytes]

    async def _reader(self) -> None:
        conn, sink = self.conn, self._sink
        count = 0
        while True:
            self._decoded = None
            frame = await conn.recv(sink)
            if frame.payload is not None:
                self._on_chunk(self._decoded, frame.payload)
            else:
                self._dispatch(decode_message(frame.header))
            count += 1
            if count % _YIELD_EVERY == 0:
                await asyncio.sleep(0)
            while self._decoding >= max(2, self._send_limit):  # decodes in flight hold staging: take no more frames
                self._decode_done.clear()
                await self._decode_done.wait()

    def _on_chunk(self, msg: Chunk, payload: memoryview) -> None:
        inc = self.incoming.get(msg.wire_id)
        if inc is None:
            return  # aborted or unknown: the payload went to scratch
        seq = msg.seq
        counters = self.channel._counters
        kind = self._target_kind
        if kind == 2 or kind == 4:
            counters["duplicates"] += 1
            if kind == 2:
                inc.pending_acks.append(seq)  # re-acknowledge: the sender may have resent after a timeout
                self._schedule_ack_flush(inc)
            return
        counters["chunks_received"] += 1
        counters["bytes_received"] += payload.nbytes
        mine = self.counters
        mine["chunks_received"] += 1
        mine["bytes_received"] += payload.nbytes
        tracer = self.channel.tracer
        arrived = time.perf_counter() if tracer is not None else 0.0
        decode_buffers, self._decode_in = self._decode_in, None
        if kind == 1 and kernels.AVAILABLE:  # staging → its pages in one compiled pass (verified first, or fused)
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
        if kind == 3:
            assert decode_buffers is not None
            self._start_decode(inc, seq, payload, decode_buffers, arrived)
            return
        if kind == 1:
            lists = inc.lists
            views, dst_seg, dst_off, piece_len = (
                self.channel._memory_views,
                lists["dst_seg"],
                lists["dst_off"],
                lists["piece_len"],
            )
            pos = 0
            for k in range(lists["piece_ptr"][seq], lists["piece_ptr"][seq + 1]):
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
        ptr = inc.lists["piece_ptr"]
        first, last = ptr[seq], ptr[seq + 1]
        lengths = table.piece_len[first:last]
        dst = self.channel._memory_base[table.dst_seg[first:last]] + table.dst_off[first:last].astype(np.uint64)
        fused = inc.hash_in_place and self._zero_copy
        expected = msg.checksum
        if inc.checksum is not None and not fused and inc.checksum(payload) != expected:
            value = -1
        else:
            value = _scatter(payload, dst, lengths, 1 if fused else 0)
            if not fused:
                value = expected
        if inc.checksum is not None and value != expected:
            self.channel._counters["checksum_failures"] += 1
            inc.bad_chunks += 1
            self.post(Nack(inc.wire_id, seq, msg.attempt, "checksum mismatch"))
            return False
        return True

    def _start_decode(
        self, inc: Incoming, seq: int, payload: memoryview, buffers: tuple[memoryview, memoryview], arrived: float
    ) -> None:
        """Dequantise / decompress a verified payload into its destination in a worker thread; ack once done."""
        lists, views = inc.lists, self.channel._memory_views
        dst_seg, dst_off, piece_len = lists["dst_seg"], lists["dst_off"], lists["piece_len"]
        targets = [
            views[dst_seg[k]][dst_off[k] : dst_off[k] + piece_len[k]]
            for k in range(lists["piece_ptr"][seq], lists["piece_ptr"][seq + 1])
        ]
        codec = inc.codec
        assert codec is not None
        inc.decoding.add(seq)
        self._decoding += 1
        future = asyncio.get_running_loop().run_in_executor(
            self.channel._worker_pool(), codec.decode, payload, lists["chunk_nbytes"][seq], targets, buffers[0]
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
            self.channel._fail_incoming(self, inc, err, notify=True)
            return
        inc.wire_bytes += size
        tracer = self.channel.tracer
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
        counters = self.channel._counters
        if inc.verified[seq]:
            counters["duplicates"] += 1
            inc.pending_acks.append(seq)
            self._schedule_ack_flush(inc)
            return
        lists = inc.lists
        counters["chunks_received"] += 1
        counters["bytes_received"] += lists["chunk_nbytes"][seq]
        mine = self.counters
        mine["chunks_received"] += 1
        mine["bytes_received"] += lists["chunk_nbytes"][seq]
        tracer = self.channel.tracer
        arrived = time.perf_counter() if tracer is not None else 0.0
        if inc.checksum_pieces is not None:
            if msg.landed is not None and self._trust_writer:  # the writer read where it wrote (verify_placed)
                value = msg.landed
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
        first, last = lists["piece_ptr"][seq], lists["piece_ptr"][seq + 1]
        if inc.hash_in_place:
            table = inc.table
            addr = self.channel._memory_base[table.dst_seg[first:last]] + table.dst_off[first:last].astype("uint64")
            return kernels.hash_pages(addr, table.piece_len[first:last])
        views, dst_seg, dst_off, piece_len = self.channel._memory_views, lists["dst_seg"], lists["dst_off"], lists["piece_len"]
        assert inc.checksum_pieces is not None
        return int(inc.checksum_pieces([views[dst_seg[k]][dst_off[k] : dst_off[k] + piece_len[k]] for k in range(first, last)]))

    def _accept(self, inc: Incoming, seq: int) -> None:
        """A chunk is in place and verified: record it and acknowledge (batched)."""
        inc.pending_acks.append(seq)
        if inc.mark_verified(seq):
            self._flush_acks(inc)
            self.channel._incoming_complete(self, inc)
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
        channel = self.channel
        if kind is Ack:
            out = self.outgoing.get(msg.wire_id)
            if out is not None:
                channel._on_ack(self, out, msg.seqs)
        elif kind is Nack:
            out = self.outgoing.get(msg.wire_id)
            if out is not None:
                channel._on_nack(self, out, msg.seq, msg.attempt)
        elif kind is Announce:
            channel._on_announce(self, msg)
        elif kind is Abort:
            channel._on_abort(self, msg)
        elif kind is Placed:
            self._on_placed(msg)
        elif kind is RegionUpdate:
            self.region = msg.region
        elif kind is Fence:
            channel._on_fence(self, msg.wire_id)
        elif kind is Pull:
            channel._on_pull(self, msg)
        elif kind is PullRefused:
            channel._on_pull_refused(self, msg)
        else:
            raise ProtocolError(f"unexpected {kind.__name__} from {self.peer} after the handshake")

    # ---- shutdown -----------------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop both tasks and close the connection (shielded: cleanup always finishes)."""
        self.closed = True
        current = asyncio.current_task()
        for task in [*self.tasks, *self._sends]:
            if task is not current:
                task.cancel()
        await asyncio.shield(self._finish_close(current))

    async def _finish_close(self, current: asyncio.Task[Any] | None) -> None:
        for task in [*self.tasks, *self._sends]:
            if task is not current:
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass
        try:
            await self.conn.aclose()
        except (ConnectionClosedError, PeerDeadError):
            pass


def _encode(
    codec: ChunkCodec,
    views: list[memoryview],
    lists: dict[str, list[int]],
    first: int,
    last: int,
    buffers: tuple[memoryview, memoryview],
    checksum: Any,
) -> tuple[memoryview, int]:
    """Worker thread: gather pieces ``first:last`` of a chunk, encode them; returns the payload and its checksum."""
    src_seg, src_off, piece_len = lists["src_seg"], lists["src_off"], lists["piece_len"]
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
