"""Per-transfer state on each side, and the public :class:`TransferHandle`."""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import msgspec

from .plan import KVChunk, TransferPlan, TransferResult
from .planner import ChunkTable

if TYPE_CHECKING:
    from .session import PeerSession
    from .wire import Announce
    from .wire_codec import ChunkCodec

__all__ = ["LayerArrival", "TransferHandle", "TransferProgress", "TransferStatus"]


class TransferStatus(enum.Enum):
    QUEUED = "queued"  # submitted, nothing sent yet
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class TransferProgress(msgspec.Struct, frozen=True):
    """A snapshot of one sending transfer."""

    transfer_id: str
    status: TransferStatus
    chunks: int
    chunks_verified: int
    bytes: int
    bytes_verified: int
    retries: int


class LayerArrival(msgspec.Struct, frozen=True):
    """Every chunk touching ``layer`` has arrived and been verified on the receiving side."""

    transfer_id: str
    layer: int
    seconds: float


def _silence(future: asyncio.Future[Any]) -> None:
    """Mark a failed future's exception as seen: whoever awaits it later still gets it."""
    if future.done() and not future.cancelled():
        future.exception()


class Outgoing:
    """A transfer this side sends. The scheduler keys it by identity."""

    __slots__ = (
        "accepted",
        "announce",
        "attempts",
        "bad_copies",
        "bytes_sent",
        "bytes_verified",
        "checksum",
        "chunks_verified",
        "codec",
        "counted",
        "deadline_timer",
        "fence_pending",
        "first_send_at",
        "future",
        "lists",
        "placing",
        "plan",
        "planned_at",
        "retries",
        "sent_at",
        "session",
        "status",
        "stopped",
        "submitted_at",
        "table",
        "wire_bytes",
        "wire_id",
    )  # fmt: skip

    def __init__(self, plan: TransferPlan, table: ChunkTable, session: PeerSession, wire_id: int, submitted_at: float) -> None:
        self.plan = plan
        self.table = table
        self.session = session
        self.wire_id = wire_id
        self.future: asyncio.Future[TransferResult] = asyncio.get_running_loop().create_future()
        self.lists = table.lists()
        self.attempts = bytearray(len(table))  # copies sent per chunk (resends after a late ack included)
        self.bad_copies: dict[int, tuple[int, int]] | None = None  # per chunk: copies NACKed, the last one's attempt
        self.retries = 0
        self.bytes_verified = 0
        self.chunks_verified = 0
        self.submitted_at = submitted_at
        self.planned_at = time.perf_counter()
        self.first_send_at = 0.0
        self.deadline_timer: asyncio.TimerHandle | None = None
        self.status = TransferStatus.QUEUED
        self.accepted = False  # the receiver acknowledged a chunk, so it took the announcement
        self.bytes_sent = 0
        self.sent_at: list[float] | None = None  # per chunk, when telemetry measures chunk latency
        self.counted = False  # counted as communication in flight by the channel's Telemetry
        self.codec: ChunkCodec | None = None  # the chunks' wire form when not as stored
        self.checksum: Any = None  # the per-chunk checksum the announcement names (None: integrity off)
        self.wire_bytes: list[int] | None = None  # per chunk, payload bytes of its last copy (with a codec)
        self.placing = 0  # chunks being written straight into the peer's memory right now
        #: a one-chunk transfer's announcement, until it goes out as the header of that chunk (one frame, one
        #: round trip); None once sent, or for transfers announced on their own
        self.announce: Announce | None = None
        self.stopped = False  # over: placement threads start no further write of it
        self.fence_pending: object = None  # the Abort or Fence to post once `placing` drops to 0

    def finish(self, result: TransferResult | None, exc: BaseException | None) -> None:
        if self.deadline_timer is not None:
            self.deadline_timer.cancel()
            self.deadline_timer = None
        if self.future.done():
            return
        if exc is None:
            self.status = TransferStatus.DONE
            self.future.set_result(result)  # type: ignore[arg-type]
        else:
            self.status = TransferStatus.FAILED
            self.future.set_exception(exc)
            _silence(self.future)


class Expectation:
    """The receiving side of one transfer id, alive before the announcement and after completion."""

    __slots__ = ("announced", "changed", "done", "layers_done", "started_at", "transfer_id", "waiters")

    def __init__(self, transfer_id: str) -> None:
        loop = asyncio.get_running_loop()
        self.transfer_id = transfer_id
        self.announced = False
        self.done: asyncio.Future[TransferResult] = loop.create_future()
        self.layers_done: list[int] = []
        self.changed = asyncio.Event()
        self.waiters = 0
        self.started_at = 0.0

    def finish(self, result: TransferResult | None, exc: BaseException | None) -> None:
        if not self.done.done():
            if exc is None:
                self.done.set_result(result)  # type: ignore[arg-type]
            else:
                self.done.set_exception(exc)
                _silence(self.done)
        self.changed.set()


class Incoming:
    """A transfer this side receives."""

    __slots__ = (
        "ack_every",
        "bad_chunks",
        "checksum",
        "checksum_pieces",
        "codec",
        "deadline_timer",
        "decoding",
        "expectation",
        "finish",
        "hash_in_place",
        "landing",
        "layer_hi",
        "layer_lo",
        "layers_left",
        "lists",
        "pages",
        "peer",
        "pending_acks",
        "priority",
        "remaining",
        "table",
        "transfer_id",
        "verified",
        "wire_bytes",
        "wire_id",
    )  # fmt: skip

    def __init__(
        self,
        transfer_id: str,
        wire_id: int,
        table: ChunkTable,
        expectation: Expectation,
        *,
        checksum: Any,
        checksum_pieces: Any = None,
        hash_in_place: bool = False,
        ack_every: int,
        peer: str,
    ) -> None:
        self.pages = 0  # pages its plan moves (counted against the peer's budget)
        self.transfer_id = transfer_id
        self.wire_id = wire_id
        self.table = table
        self.lists = table.lists()
        self.verified = bytearray(len(table))
        self.remaining = len(table)
        self.layer_lo: list[int] = table.chunk_layer_lo.tolist()
        self.layer_hi: list[int] = table.chunk_layer_hi.tolist()
        self.layers_left = table.chunks_per_layer()
        self.expectation = expectation
        self.checksum = checksum
        self.checksum_pieces = checksum_pieces
        self.hash_in_place = hash_in_place  # xxh3 of placed pages by the compiled loop (kernels), not in Python
        self.ack_every = ack_every
        self.pending_acks: list[int] = []
        self.bad_chunks = 0
        self.peer = peer
        self.priority = 1  # its plan's Priority (the announcement's): what fan-in arbitration counts
        self.deadline_timer: asyncio.TimerHandle | None = None
        self.codec: ChunkCodec | None = None
        self.decoding: set[int] = set()  # chunks being decoded by a worker thread
        self.wire_bytes = 0  # payload bytes of the chunks accepted
        # payloads landing in its pages on extra connections (lanes) right now: it ends (result or error) only once
        # none does, so nothing writes into its pages after the caller was told it is over; ``finish`` waits then
        self.landing = 0
        self.finish: tuple[TransferResult | None, BaseException | None] | None = None

    def mark_verified(self, seq: int) -> bool:
        """Record a verified chunk; True when it was the last."""
        self.verified[seq] = 1
        self.remaining -= 1
        left = self.layers_left
        for layer in range(self.layer_lo[seq], self.layer_hi[seq] + 1):
            left[layer] -= 1
            if left[layer] == 0:
                self.expectation.layers_done.append(layer)
                self.expectation.changed.set()
        return self.remaining == 0


class TransferHandle:
    """What :meth:`KVTransferChannel.submit` returns: await :meth:`wait`, mark layers ready, cancel."""

    def __init__(
        self,
        outgoing: Outgoing,
        mark_ready: Callable[[Outgoing, Iterable[int]], None],
        cancel: Callable[[Outgoing, str], None],
    ) -> None:
        self._out = outgoing
        self._mark_ready, self._cancel = mark_ready, cancel  # the owning channel's

    @property
    def transfer_id(self) -> str:
        return self._out.plan.transfer_id

    @property
    def plan(self) -> TransferPlan:
        return self._out.plan

    @property
    def status(self) -> TransferStatus:
        return self._out.status

    def done(self) -> bool:
        return self._out.future.done()

    async def wait(self) -> TransferResult:
        """The result once the receiver verified every chunk; raises the transfer's error otherwise.
        Cancelling the wait does not cancel the transfer (see :meth:`KVTransferChannel.transfer`)."""
        return await asyncio.shield(self._out.future)

    def mark_layer_ready(self, layer: int) -> None:
        """Layer ``layer`` of the source is final: its chunks may go (progressive plans)."""
        self._mark_ready(self._out, (layer,))

    def mark_layers_ready(self, layers: Iterable[int] | None = None) -> None:
        """Several layers at once (``None``: all)."""
        chosen = range(self._out.plan.schema.num_layers) if layers is None else layers
        self._mark_ready(self._out, chosen)

    def cancel(self, reason: str = "cancelled by the caller") -> None:
        """Abort the transfer here and at the peer; :meth:`wait` raises ``TransferAbortedError``."""
        self._cancel(self._out, reason)

    def chunk(self, seq: int) -> KVChunk:
        """What chunk ``seq`` of this transfer covers: its layers, source and destination runs, offset and size."""
        out = self._out
        return out.table.chunk(
            seq, transfer_id=out.plan.transfer_id, priority=out.plan.priority, wire_dtype=out.plan.target_dtype
        )

    def progress(self) -> TransferProgress:
        out = self._out
        return TransferProgress(
            transfer_id=out.plan.transfer_id,
            status=out.status,
            chunks=len(out.table),
            chunks_verified=out.chunks_verified,
            bytes=out.table.total_bytes,
            bytes_verified=out.bytes_verified,
            retries=out.retries,
        )
