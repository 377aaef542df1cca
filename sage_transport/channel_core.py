"""The channel's state and the pieces its parts share: :class:`ChannelCore`."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import uuid
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog

from .attest import AttestationServer
from .config import Compression, KVTransportConfig
from .errors import (
    ConnectionClosedError,
    ProtocolError,
    UnsupportedError,
)
from .fan_in import FanInArbiter
from .integrity import checksum_function, streaming_checksum_function
from .memory import KVMemory
from .plan import TransferPlan, TransferResult
from .scheduler import Scheduler
from .schema import DType, KVCacheSchema
from .session import PeerSession
from .session_host import SessionHost
from .telemetry.core import Histogram, Telemetry
from .telemetry.trace import ChunkTracer
from .transfers import Expectation, Incoming, Outgoing, TransferHandle
from .transports.base import Listener, Transport
from .transports.registry import get_transport_class
from .wire import Abort, Ack, Announce, Fence, Hold, Nack, Pull, PullRefused
from .wire_codec import QUANTISED, ChunkCodec, require_codec

log = structlog.get_logger("sage_transport.channel")

_RECENT_RESULTS = 1024
_RAW = "as stored"
_AUTO_MIN_BYTES = 8 << 20  # transfers smaller than this say more about latency than about the link's rate
_AUTO_REPROBE = 64  # codec_policy=auto re-measures the choice not in use every this many transfers


def _choice(wire: DType | None, compression: Compression) -> str:
    return f"{wire.value if wire is not None else 'stored'}+{compression.value}"


_UNTRUSTED = (
    "not trusted: this side has no auth_token, and the kernel did not attest the peer as a process of this user on "
    "this host (give both sides auth_token)"
)


_PEER_PAGE_BUDGET = 2  # pages in one peer's open transfers, as a multiple of the registered pages


_MAX_PULLS_PER_PEER = 1024  # transfers a peer may have us send it at once


_REFUSED_CHUNK_LIMIT = 64 << 20  # chunks of a refused transfer up to this size are discarded (staging), not fatal


def _plan_pages(schema: KVCacheSchema, mappings: Iterable[Any]) -> int:
    """Pages a plan moves, computed from its mappings before anything is planned."""
    return int(schema.kv_planes * sum((m.layer_stop - m.layer_start) * len(m.dst_blocks) for m in mappings))


def _wire_form(codec: ChunkCodec | None, stored: DType) -> tuple[str, str]:
    """A transfer's ``(kv_dtype, compression)`` on the wire, for its result: as stored without a codec."""
    if codec is None:
        return stored.value, "none"
    return (codec.wire_dtype or codec.stored).value, codec.compression.value


def _registered_pages(memory: KVMemory) -> int:
    return memory.schema.num_layers * memory.schema.kv_planes * memory.num_blocks


def _same_shape(a: KVCacheSchema, b: KVCacheSchema) -> bool:
    fields = ("num_layers", "num_kv_heads", "head_dim", "block_size", "dtype", "kv_planes")
    return all(getattr(a, f) == getattr(b, f) for f in fields)


class ChannelCore:
    """A channel's state, shared by the parts that act on it (:mod:`.channel_peers`, :mod:`.channel_sending`,
    :mod:`.channel_receiving`, :mod:`.channel_pulls`, :mod:`.channel_stats`), and the one interface its sessions
    report through (:class:`~sage_transport.session_host.SessionHost`). :class:`~sage_transport.channel.KVTransferChannel`
    puts the parts together."""

    def __init__(
        self,
        transport: Transport | str | None = None,
        config: KVTransportConfig | str | None = None,
        *,
        name: str | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        if isinstance(config, str):
            config = KVTransportConfig.from_string(config)
        self.config = config if config is not None else KVTransportConfig()
        if self.config.codec_policy == "always":  # auto uses a codec only where it can (and where it pays)
            if self.config.compression is not Compression.NONE:
                require_codec(self.config.compression.value, "compression")
            if self.config.target_dtype in QUANTISED:
                require_codec(self.config.target_dtype.value, "target_dtype")  # type: ignore[union-attr]
        self._owns_transport = not isinstance(transport, Transport)
        self.transport: Transport = (
            transport
            if isinstance(transport, Transport)
            else get_transport_class(transport or self.config.backend).from_config(self.config)
        )
        if not self.transport.capabilities.ordered:
            raise UnsupportedError(f"transport {self.transport.name!r} is unordered; the channel needs ordered frames")
        self.name = name or f"sage-{uuid.uuid4().hex[:8]}"
        self._scheduler = Scheduler(window=self.config.peer_window, max_inflight=self.config.max_inflight)
        self._checksum = checksum_function(self.config.integrity)
        self._checksum_pieces = streaming_checksum_function(self.config.integrity)
        self._counters: collections.Counter[str] = collections.Counter()
        self.telemetry = telemetry if telemetry is not None else Telemetry()
        self._measure = self.config.telemetry
        self._chunk_latency = Histogram()
        self._transfer_seconds = {"sent": Histogram(), "received": Histogram()}
        self._failures: collections.Counter[str] = collections.Counter()
        #: called on the loop with ``(transfer_id, result, error)`` when a transfer this side sends ends (pulled by a
        #: peer or submitted here): how an engine adapter learns that the blocks a peer pulled can be freed
        self.on_sent: Callable[[str, TransferResult | None, BaseException | None], None] | None = None
        #: called on the loop with ``(peer, plan)`` for each pull a peer asks of us: returns the plan to send (the
        #: application may name its own source blocks or make it progressive), or ``None`` to defer it until
        #: :meth:`serve_pull` or :meth:`refuse_pull` (a ``SageTransportError`` refuses it with its message). How a
        #: prefill engine serves a decode that asks before the KV exists, layer by layer as it is computed.
        self.pull_resolver: Callable[[str, TransferPlan], TransferPlan | None] | None = None
        self._deferred_pulls: dict[str, tuple[PeerSession, TransferPlan]] = {}
        self._memory: KVMemory | None = None
        self._device: Any = None  # DeviceKV when the registered memory is on a device (sage_transport.device)
        self._memory_views: list[memoryview] = []
        self._memory_base = np.zeros(0, dtype=np.uint64)  # each registered buffer's address (compiled loops)
        self._placement_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._sessions: dict[str, PeerSession] = {}
        # sessions that granted extra connections (lanes) still to join: key → (session, lanes granted, joined)
        self._lane_keys: dict[bytes, tuple[PeerSession, int, set[int]]] = {}
        self._profile_connections: int | None = None  # connections_per_peer=0: the profile's, once probed
        self._fan_in = FanInArbiter(self.config.fan_in_priority)  # ranks incoming chunks across senders
        self._listeners: list[Listener] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._outgoing: dict[str, Outgoing] = {}
        self._expect: dict[str, Expectation] = {}
        self._recent: collections.OrderedDict[str, Expectation] = collections.OrderedDict()
        self._attestation: AttestationServer | None = None
        self._open = False
        self._closed = False
        #: what every session is given: the shared state below and the callbacks it reports through
        self._host = SessionHost(
            config=self.config,
            scheduler=self._scheduler,
            counters=self._counters,
            checksum=self._checksum,
            checksum_pieces=self._checksum_pieces,
            worker_pool=self._worker_pool,
            on_control=self._on_control,
            session_failed=self._session_failed,
            placement_failed=self._placement_failed,
            incoming_complete=self._incoming_complete,
            landed=self._incoming_landed,
            fail_outgoing=self._fail_outgoing,
            fail_incoming=self._fail_incoming,
        )

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _check_open(self) -> None:
        if not self._open:
            raise ConnectionClosedError(f"channel {self.name} is not open: use `async with KVTransferChannel(...)`")

    @property
    def tracer(self) -> ChunkTracer | None:
        """Set to a :class:`~sage_transport.telemetry.trace.ChunkTracer` to record every chunk's life (``migrate --trace``)."""
        return self._host.tracer

    @tracer.setter
    def tracer(self, tracer: ChunkTracer | None) -> None:
        self._host.tracer = tracer

    def _on_control(self, session: PeerSession, msg: Any) -> None:
        """A control message a session passed on: acknowledgements, announcements, aborts, fences, pulls."""
        kind = type(msg)
        if kind is Ack:
            out = session.outgoing.get(msg.wire_id)
            if out is not None:
                self._on_ack(session, out, msg.seqs)
        elif kind is Nack:
            out = session.outgoing.get(msg.wire_id)
            if out is not None:
                self._on_nack(session, out, msg.seq, msg.attempt)
        elif kind is Announce:
            self._on_announce(session, msg)
        elif kind is Abort:
            self._on_abort(session, msg)
        elif kind is Fence:
            self._on_fence(session, msg.wire_id)
        elif kind is Pull:
            self._on_pull(session, msg)
        elif kind is PullRefused:
            self._on_pull_refused(session, msg)
        elif kind is Hold:  # the peer receives from others too and ranks us: start no chunk of these classes
            self._scheduler.hold(session.peer, msg.held)
            self._counters["holds_received"] += 1
            session.wake.set()
        else:
            raise ProtocolError(f"unexpected {kind.__name__} from {session.peer} after the handshake")

    if TYPE_CHECKING:  # what one part calls of another (each defined in its own module)

        def _fail_incoming(self, session: PeerSession, inc: Incoming, exc: BaseException, *, notify: bool) -> None: ...
        def _fail_outgoing(self, out: Outgoing, exc: BaseException, *, notify: bool) -> None: ...
        def _finish_expectation(self, exp: Expectation, result: TransferResult | None, exc: BaseException | None) -> None: ...
        def _fence_late(self, session: PeerSession, wire_id: int) -> None: ...
        def _on_fence(self, session: PeerSession, wire_id: int) -> None: ...
        def _post_when_fenced(self, out: Outgoing, message: Abort | Fence) -> None: ...
        def accepted_codecs(self) -> list[str]: ...
        def _expectation(self, transfer_id: str) -> Expectation: ...
        def _session_for(self, plan: TransferPlan, doing: str) -> PeerSession: ...
        def submit(self, plan: TransferPlan) -> TransferHandle: ...
        async def wait_received(self, transfer_id: str) -> TransferResult: ...
        @property
        def peers(self) -> list[str]: ...
        def _session_failed(self, session: PeerSession, exc: BaseException) -> None: ...
        def _placement_failed(self, session: PeerSession, exc: BaseException) -> None: ...
        def _incoming_complete(self, session: PeerSession, inc: Incoming) -> None: ...
        def _incoming_landed(self, inc: Incoming) -> None: ...
        def _on_ack(self, session: PeerSession, out: Outgoing, seqs: list[int]) -> None: ...
        def _on_nack(self, session: PeerSession, out: Outgoing, seq: int, attempt: int) -> None: ...
        def _on_announce(self, session: PeerSession, msg: Announce) -> None: ...
        def _on_abort(self, session: PeerSession, msg: Abort) -> None: ...
        def _on_pull(self, session: PeerSession, msg: Pull) -> None: ...
        def _on_pull_refused(self, session: PeerSession, msg: PullRefused) -> None: ...
        def _worker_pool(self) -> concurrent.futures.ThreadPoolExecutor: ...
