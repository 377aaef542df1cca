"""Transfers this side receives: announcements checked and taken, completion and failure, and the waiters on them."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator

from . import kernels
from .channel_core import (
    _PEER_PAGE_BUDGET,
    _RECENT_RESULTS,
    _REFUSED_CHUNK_LIMIT,
    _UNTRUSTED,
    ChannelCore,
    _plan_pages,
    _registered_pages,
    _same_shape,
    _wire_form,
    log,
)
from .config import Compression, Integrity
from .errors import (
    ConfigError,
    PlanError,
    TransferAbortedError,
    TransferTimeoutError,
)
from .integrity import checksum_function, streaming_checksum_function
from .plan import IntegrityStatus, TransferResult
from .planner import plan_chunks
from .schema import DType
from .session import PeerSession
from .transfers import Expectation, Incoming, LayerArrival
from .wire import Abort, Ack, Announce, Fence
from .wire_codec import ChunkCodec


class ReceivingSide(ChannelCore):
    """What happens to a transfer this side receives, from its announcement to its result."""

    def _expectation(self, transfer_id: str) -> Expectation:
        exp = self._expect.get(transfer_id) or self._recent.get(transfer_id)
        if exp is None:
            exp = self._expect[transfer_id] = Expectation(transfer_id)
        return exp

    def _on_announce(self, session: PeerSession, msg: Announce) -> None:
        tid = msg.transfer_id

        def refuse(reason: str) -> None:
            # its chunks may already be on their way (senders do not wait for acceptance): discard those, within
            # what it could send; anything larger ends the session
            session.max_wire_id_in = max(session.max_wire_id_in, msg.wire_id)
            session.max_incoming_chunk = max(session.max_incoming_chunk, min(msg.chunk_size + 4096, _REFUSED_CHUNK_LIMIT))
            self._counters["transfers_refused"] += 1
            session.post(Abort(msg.wire_id, False, f"refused by {self.name}: {reason}"))
            log.warning("transfer.refused", transfer_id=tid, peer=session.peer, reason=reason)
            pulled = session.pulls.pop(tid, None)
            session.pull_destinations.pop(tid, None)
            if pulled is not None:  # we asked for it: our own pull fails with the reason
                self._finish_expectation(pulled, None, TransferAbortedError(f"transfer {tid} from {session.peer}: {reason}"))

        if self._memory is None:
            return refuse("no KV memory registered")
        asked = session.pull_destinations.get(tid)
        if asked is None:  # a push: only from a trusted peer, and only where pushes are accepted
            if not session.trusted:
                self._counters["untrusted_refusals"] += 1
                return refuse(_UNTRUSTED)
            if not self.config.accept_push:
                return refuse("pushes are refused here (accept_push=false): pull instead")
        elif sorted((m.layer_start, m.layer_stop, m.dst_blocks) for m in msg.mappings) != asked:
            return refuse(f"transfer {tid} writes other destination blocks than our pull asked for")
        if not _same_shape(msg.schema, self._memory.schema):
            return refuse(f"schema {msg.schema} does not match ours {self._memory.schema}")
        if msg.integrity not in {m.value for m in Integrity}:
            return refuse(f"integrity={msg.integrity!r} is not supported")
        if msg.integrity == Integrity.NONE.value and self.config.integrity is not Integrity.NONE:
            return refuse(f"integrity=none: this side verifies every chunk (integrity={self.config.integrity.value})")
        if self._device is not None and msg.integrity not in (Integrity.FLETCHER64.value, Integrity.NONE.value):
            return refuse(f"integrity={msg.integrity}: device KV is verified on the device, with fletcher64")
        if self._device is not None and msg.compression != Compression.NONE.value:
            return refuse(f"compression={msg.compression}: device KV is decoded on the device, which decompresses nothing")
        pages = _plan_pages(msg.schema, msg.mappings)
        registered = _registered_pages(self._memory)
        if pages > registered:
            return refuse(f"the plan moves {pages} pages, more than the {registered} registered here")
        if session.incoming_pages + pages > _PEER_PAGE_BUDGET * registered:
            return refuse(
                f"{session.incoming_pages} pages already in flight from {session.peer}; {pages} more exceed its budget "
                f"({_PEER_PAGE_BUDGET}x the {registered} registered here)"
            )
        exp = self._expect.get(tid)
        if exp is not None and exp.announced:
            return refuse(f"transfer id {tid} is already being received")
        codec = None
        if msg.wire_dtype or msg.compression != Compression.NONE.value:
            accepted = self.accepted_codecs()
            for name in (msg.wire_dtype, "" if msg.compression == Compression.NONE.value else msg.compression):
                if name and name not in accepted:
                    return refuse(
                        f"{name} on the wire is not accepted here (accepts: {', '.join(accepted) or 'only KV as stored'})"
                    )
            try:
                wire = DType.parse(msg.wire_dtype, "wire_dtype") if msg.wire_dtype else None
                codec = ChunkCodec(msg.schema.dtype, wire, msg.group_size or 128, Compression(msg.compression))
            except (ConfigError, ValueError) as exc:
                return refuse(str(exc))
        try:
            table = plan_chunks(
                msg.schema, msg.mappings, msg.src_geometry, self._memory.geometry, msg.chunk_size,
                gather=msg.gather, progressive=msg.progressive,
            )  # fmt: skip
        except PlanError as exc:
            return refuse(str(exc))
        if (len(table), table.total_bytes, table.digest) != (msg.num_chunks, msg.total_bytes, msg.digest):
            return refuse(
                f"chunk tables differ: ours has {len(table)} chunks / {table.total_bytes} bytes, "
                f"the sender's {msg.num_chunks} / {msg.total_bytes}"
            )
        session.pulls.pop(tid, None)
        session.pull_destinations.pop(tid, None)
        if exp is None:
            self._recent.pop(tid, None)
            exp = self._expect[tid] = Expectation(tid)
        exp.announced = True
        exp.started_at = time.perf_counter()
        mode = Integrity(msg.integrity)
        inc = session.incoming[msg.wire_id] = Incoming(
            tid,
            msg.wire_id,
            table,
            exp,
            checksum=checksum_function(mode),
            checksum_pieces=streaming_checksum_function(mode),
            hash_in_place=mode is Integrity.XXH3 and kernels.ready(),  # verified on the loop: only once compiled
            ack_every=msg.ack_every,
            peer=session.peer,
        )
        inc.codec = codec
        inc.pages = pages
        inc.priority = msg.priority
        self._fan_in.opened(session, msg.priority, self._sessions.values())
        session.incoming_pages += pages
        session.max_wire_id_in = max(session.max_wire_id_in, msg.wire_id)
        largest = table.max_chunk_bytes
        session.max_incoming_chunk = max(session.max_incoming_chunk, codec.bound(largest) if codec is not None else largest)
        self.telemetry.comm_begin()
        if session.window_offered and codec is None and msg.inline_checksum is None:  # may place every chunk from now on
            session.post(Ack(msg.wire_id, []))  # accepted, nothing verified yet
        if msg.deadline_s:
            # the sender's own timer fires first and aborts; this one covers a sender that went silent
            grace = max(0.5, 0.1 * msg.deadline_s)
            inc.deadline_timer = asyncio.get_running_loop().call_later(
                msg.deadline_s + grace, self._on_incoming_deadline, session, inc, msg.deadline_s
            )
        exp.changed.set()

    def _on_incoming_deadline(self, session: PeerSession, inc: Incoming, deadline: float) -> None:
        received = len(inc.table) - inc.remaining
        err = TransferTimeoutError(
            f"transfer {inc.transfer_id} from {session.peer} missed its {deadline:g}s deadline with "
            f"{received}/{len(inc.table)} chunks received"
        )
        self._fail_incoming(session, inc, err, notify=True)

    def _finish_expectation(self, exp: Expectation, result: TransferResult | None, exc: BaseException | None) -> None:
        exp.finish(result, exc)
        if self._expect.get(exp.transfer_id) is exp:
            del self._expect[exp.transfer_id]
        self._recent[exp.transfer_id] = exp
        while len(self._recent) > _RECENT_RESULTS:
            self._recent.popitem(last=False)

    def _incoming_complete(self, session: PeerSession, inc: Incoming) -> None:
        if session.incoming.pop(inc.wire_id, None) is not None:
            self.telemetry.comm_end()
            session.incoming_pages -= inc.pages
            self._fan_in.closed(session, inc.priority, self._sessions.values())
        if inc.deadline_timer is not None:
            inc.deadline_timer.cancel()
        wall = time.perf_counter() - inc.expectation.started_at
        codec = inc.codec
        kv_dtype, compression = _wire_form(codec, inc.table.schema.dtype)
        result = TransferResult(
            transfer_id=inc.transfer_id,
            peer=session.peer,
            bytes=inc.table.total_bytes,
            wire_bytes=inc.wire_bytes if codec is not None else inc.table.total_bytes,
            kv_dtype=kv_dtype,
            compression=compression,
            chunks=len(inc.table),
            wall_s=wall,
            retries=inc.bad_chunks,
            integrity=IntegrityStatus.UNCHECKED if inc.checksum is None else IntegrityStatus.VERIFIED,
            phases={"transfer_s": wall},
        )
        self._counters["transfers_received"] += 1
        if self._measure:
            self._transfer_seconds["received"].observe(wall)
        self._finish_incoming(inc, result, None)
        # logged after the acknowledgement is on its way (rendering a line costs tens of microseconds)
        asyncio.get_running_loop().call_soon(functools.partial(
            log.info, "transfer.received", transfer_id=inc.transfer_id, peer=session.peer, bytes=result.bytes,
            chunks=result.chunks, seconds=round(wall, 6), bad_chunks=inc.bad_chunks,
        ))  # fmt: skip

    def _fail_incoming(self, session: PeerSession, inc: Incoming, exc: BaseException, *, notify: bool) -> None:
        if session.incoming.pop(inc.wire_id, None) is None:
            return
        self.telemetry.comm_end()
        self._fan_in.closed(session, inc.priority, self._sessions.values())
        if inc.deadline_timer is not None:
            inc.deadline_timer.cancel()
        session.incoming_pages -= inc.pages
        self._counters["transfers_failed"] += 1
        self._failures[type(exc).__name__] += 1
        log.warning("transfer.failed", transfer_id=inc.transfer_id, peer=session.peer, error=str(exc))
        if notify and not session.closed:
            session.post(Abort(inc.wire_id, False, str(exc)[:1024]))
            if session.window_offered:  # it may be writing our memory: the failure is final once it fences
                timer = asyncio.get_running_loop().call_later(self.config.ack_timeout_s, self._fence_late, session, inc.wire_id)
                session.fencing[inc.wire_id] = (inc.expectation, exc, timer)
                return
        self._finish_incoming(inc, None, exc)

    def _finish_incoming(self, inc: Incoming, result: TransferResult | None, exc: BaseException | None) -> None:
        """Tell the waiters an incoming transfer is over, once no lane still lands a payload in its pages."""
        if inc.landing:
            inc.finish = (result, exc)
        else:
            self._finish_expectation(inc.expectation, result, exc)

    def _incoming_landed(self, inc: Incoming) -> None:
        if inc.finish is not None:
            result, exc = inc.finish
            inc.finish = None
            self._finish_expectation(inc.expectation, result, exc)

    def _on_abort(self, session: PeerSession, msg: Abort) -> None:
        if msg.from_sender:  # a sender aborts only once none of its direct writes runs: it fences too
            self._on_fence(session, msg.wire_id)
            inc = session.incoming.get(msg.wire_id)
            if inc is not None:
                err = TransferAbortedError(f"peer {session.peer} aborted transfer {inc.transfer_id}: {msg.reason}")
                self._fail_incoming(session, inc, err, notify=False)
        else:
            out = session.outgoing.get(msg.wire_id)
            if out is not None:
                err = TransferAbortedError(f"peer {session.peer} aborted transfer {out.plan.transfer_id}: {msg.reason}")
                self._fail_outgoing(out, err, notify=False)
                self._post_when_fenced(out, Fence(out.wire_id))
            elif msg.wire_id <= session.last_wire_id:  # over already (an Abort of it may still be on its way)
                session.post(Fence(msg.wire_id))

    async def wait_received(self, transfer_id: str) -> TransferResult:
        """Wait until transfer ``transfer_id`` has fully arrived here and been verified (the announcement may
        come later than this call). Bound it with ``asyncio.timeout``; raises the transfer's error."""
        exp = self._expectation(transfer_id)
        exp.waiters += 1
        try:
            return await asyncio.shield(exp.done)
        finally:
            self._drop_waiter(exp)

    async def arrivals(self, transfer_id: str) -> AsyncIterator[LayerArrival]:
        """Yield each layer of ``transfer_id`` once all its chunks are verified here; ends when the transfer does."""
        exp = self._expectation(transfer_id)
        exp.waiters += 1
        try:
            index = 0
            while True:
                while index < len(exp.layers_done):
                    layer = exp.layers_done[index]
                    index += 1
                    yield LayerArrival(transfer_id, layer, time.perf_counter() - exp.started_at)
                if exp.done.done():
                    exp.done.result()
                    return
                exp.changed.clear()
                await exp.changed.wait()
        finally:
            self._drop_waiter(exp)

    async def wait_layer(self, transfer_id: str, layer: int) -> None:
        """Wait until every chunk touching ``layer`` of ``transfer_id`` is verified here."""
        async for arrival in self.arrivals(transfer_id):
            if arrival.layer == layer:
                return
        raise PlanError(f"transfer {transfer_id} completed without layer {layer}")

    def _drop_waiter(self, exp: Expectation) -> None:
        exp.waiters -= 1
        if exp.waiters == 0 and not exp.announced and not exp.done.done() and self._expect.get(exp.transfer_id) is exp:
            del self._expect[exp.transfer_id]
