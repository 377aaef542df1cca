"""One connected peer: a writer task (control messages first, then chunks the scheduler picks) and a
reader task (payloads land in place, are verified, acknowledged in batches). This is the hot path:
per chunk it does list lookups, one memoryview slice, one checksum, one small header; no logging."""

from __future__ import annotations

import asyncio
import functools
from typing import TYPE_CHECKING, Any

from .errors import ConnectionClosedError, PeerDeadError, ProtocolError, TransportError
from .placement import ShmWriter
from .wire import (
    encode_message,
)

if TYPE_CHECKING:
    import concurrent.futures

    from .placement import CmaWriter
from .session_receive import ReceivePath
from .session_send import SendPath
from .session_state import _INLINE_PLACE_BYTES, _PLACED_WINDOW_FACTOR, _YIELD_EVERY, ReadSlot

__all__ = ["PeerSession"]


class PeerSession(SendPath, ReceivePath):
    """State and tasks of one peer connection. Created by the channel after a successful handshake; it reports
    to the channel only through the :class:`~sage_transport.session_host.SessionHost` it is given."""

    @property
    def placement_kind(self) -> str:
        """``shm`` (memory copy into the peer's shared KV cache), ``cma`` (process_vm_writev), ``device_ipc`` (the
        peer's device KV mapped through CUDA IPC) or ``none``."""
        if self.placer is None:
            return "none"
        if self.host.device is not None:
            return "device_ipc"
        return "shm" if isinstance(self.placer, ShmWriter) else "cma"

    def set_send_lanes(self, send_lanes: int) -> None:
        """Chunk sends (and direct writes) in flight at once for this peer, from now on."""
        self._send_limit = send_lanes
        self._place_limit = send_lanes + 1

    def enable_placement(self, placer: CmaWriter | ShmWriter, pool: concurrent.futures.Executor) -> None:
        """Write chunks of accepted transfers straight into the peer's memory from now on."""
        self.placer, self._placement_pool = placer, pool
        self.host.scheduler.widen(self.peer, _PLACED_WINDOW_FACTOR)
        self.wake.set()

    def add_lane(self, conn: Any) -> None:
        """Carry chunks over ``conn`` too (an extra connection to the same peer, already bound to this session):
        chunks go on the least busy connection, and a lane that fails fails the session, as its own would."""
        if self.closed:
            raise ConnectionClosedError(f"the session with {self.peer} is over")
        self.lanes.append(conn)
        self._lane_busy.append(0)
        slot = ReadSlot(lane=True, scatters=conn.gathers)
        self.tasks.append(
            asyncio.create_task(self._run(self._lane_reader(conn, slot)), name=f"sage-lane-{self.peer}-{len(self.lanes)}")
        )
        self.wake.set()

    async def _lane_reader(self, conn: Any, slot: ReadSlot) -> None:
        """Read chunks from one extra connection (a lane): the same path as the session's own reader."""
        sink = functools.partial(self._sink_into, slot)
        count = 0
        try:
            while True:
                slot.decoded = None
                frame = await conn.recv(sink)
                if frame.payload is None:
                    raise ProtocolError(f"a control message from {self.peer} on an extra connection, which carries chunks only")
                self._on_chunk(slot, frame.payload)
                count += 1
                if count % _YIELD_EVERY == 0:
                    await asyncio.sleep(0)
                while self._decoding >= max(2, self._send_limit):
                    self._decode_done.clear()
                    await self._decode_done.wait()
        finally:
            await self._release_landing(conn, slot)

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
            self.host.session_failed(self, exc)
        except Exception as exc:
            self.host.counters["internal_errors"] += 1
            self.host.session_failed(self, TransportError(f"session with {self.peer} crashed: {exc!r}"))
            raise

    async def _writer(self) -> None:
        host, conn, outbox = self.host, self.conn, self.outbox
        scheduler = host.scheduler
        while True:
            while outbox:
                await conn.send(outbox.popleft())
            # a codec chunk is encoded before it is sent: two at least, so one encodes while another is on the wire
            limit = self._send_limit * len(self._lane_busy)  # ``send_lanes`` per connection (lanes add theirs)
            if self._encoding:
                limit = max(2, limit)
            busy = self._placing >= self._place_limit or len(self._sends) >= limit
            pick = None
            if not busy:
                pick, self._held_pick = self._held_pick or scheduler.next_for(self.peer), None
            if self._unaccepted and not busy:
                self._release_unaccepted()
            if pick is not None:
                out, seq = pick
                if out.announce is not None:  # type: ignore[attr-defined]
                    # a one-chunk transfer's first copy carries its announcement: the writer sends it itself, so
                    # no control message posted after it (an abort) can overtake it
                    await self._send_chunk(out, seq)  # type: ignore[arg-type]
                    continue
                if self.placer is not None and out.codec is None:  # type: ignore[attr-defined]
                    if out.accepted:  # type: ignore[attr-defined]
                        self._start_placement(out, self._placement_batch(out, seq))  # type: ignore[arg-type]
                        continue
                    if len(out.table) > 1 and out.lists.chunk_nbytes[seq] > _INLINE_PLACE_BYTES:  # type: ignore[attr-defined]
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
                async with asyncio.timeout(host.config.ack_timeout_s if waiting_for_acks else None):
                    await self.wake.wait()
            except TimeoutError:
                resent = scheduler.resend_inflight(self.peer)
                host.counters["resends_after_timeout"] += resent

    def _chunk_sent(self, task: asyncio.Task[None]) -> None:
        self._sends.discard(task)
        self.wake.set()
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None or self.closed:
            return
        if isinstance(exc, (TransportError, ProtocolError)):
            self.host.session_failed(self, exc)
        else:
            self.host.session_failed(self, TransportError(f"sending to {self.peer} crashed: {exc!r}"))

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
        close_placer = getattr(self.placer, "close", None)  # a device writer unmaps the peer's KV
        if close_placer is not None:
            close_placer()
        for conn in [self.conn, *self.lanes]:
            try:
                await conn.aclose()
            except (ConnectionClosedError, PeerDeadError):
                pass
