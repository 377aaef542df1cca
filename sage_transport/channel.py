"""``KVTransferChannel``: register KV memory once, connect peers, ``await channel.transfer(plan)``.

The channel plans (:mod:`.planner`), schedules (:mod:`.scheduler`) and drives one
:class:`~sage_transport.session.PeerSession` per peer over any :class:`~sage_transport.transports.base.Transport`.
It knows nothing of a particular transport. ``transfer`` returns when the receiver verified every chunk;
the receiver awaits the same transfer with :meth:`wait_received` or iterates :meth:`arrivals`.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from types import TracebackType
from typing import Any

import msgspec
import numpy as np
import structlog

from . import kernels
from .attest import Attestation, AttestationServer, PeerIdentity, Presented, attest_peer, close_fds, present_to, supported
from .config import Compression, Integrity, KVTransportConfig, require_token_off_loopback
from .errors import (
    ChecksumError,
    ConfigError,
    ConnectionClosedError,
    PeerDeadError,
    PlanError,
    ProtocolError,
    SageTransportError,
    TransferAbortedError,
    TransferTimeoutError,
    TransportError,
    UnsupportedError,
)
from .handshake import Capabilities, client_handshake, server_handshake
from .integrity import checksum_function, streaming_checksum_function
from .memory import KVMemory
from .placement import CmaWriter, ShmWriter, buffer_address, cma_available, host_identity
from .plan import IntegrityStatus, Priority, TransferPlan, TransferResult
from .planner import plan_chunks
from .scheduler import AckOutcome, Scheduler
from .schema import DType, KVCacheSchema
from .session import PeerSession
from .telemetry.core import Histogram, HistogramSnapshot, Telemetry
from .telemetry.trace import ChunkTracer
from .transfers import Expectation, Incoming, LayerArrival, Outgoing, TransferHandle
from .transports.base import Connection, Listener, Transport
from .transports.registry import get_transport_class
from .wire import MAX_CONTROL_BYTES, Abort, Ack, Announce, Fence, Pull, PullRefused, Region, RegionUpdate, Window
from .wire_codec import QUANTISED, ChunkCodec, codec_throughput, local_codecs, require_codec

__all__ = ["ChannelStatistics", "KVTransferChannel"]

log = structlog.get_logger("sage_transport.channel")

_RECENT_RESULTS = 1024
_RAW = "as stored"
_AUTO_MIN_BYTES = 8 << 20  # transfers smaller than this say more about latency than about the link's rate
_AUTO_REPROBE = 64  # codec_policy=auto re-measures the choice not in use every this many transfers


def _choice(wire: DType | None, compression: Compression) -> str:
    return f"{wire.value if wire is not None else 'stored'}+{compression.value}"


class ChannelStatistics(msgspec.Struct, frozen=True):
    """A snapshot of a channel's counters (plain integers updated on the hot path)."""

    name: str
    peers: list[str]
    transfers_sending: int
    transfers_receiving: int
    transfers_completed: int
    transfers_failed: int
    chunks_sent: int
    chunks_received: int
    bytes_sent: int
    bytes_received: int
    retries: int
    checksum_failures: int
    duplicates: int
    inflight_chunks: int
    queued_chunks: int
    handshake_failures: int
    transfers_refused: int
    chunks_placed: int = 0  # of chunks_sent: written straight into a same-host peer's memory (CMA)
    placement_failures: int = 0
    inflight_bytes: int = 0  # sent and not yet acknowledged
    failures_by_kind: dict[str, int] = {}  # failed transfers by exception type
    stale_messages: int = 0  # ignored: a NACK about an attempt already superseded, or one never sent
    protocol_errors: int = 0  # sessions ended because the peer broke the protocol (typed refusals)
    internal_errors: int = 0  # sessions ended by an unexpected exception here (a bug: should stay 0)
    untrusted_refusals: int = 0  # pulls, pushes and windows refused: the peer is neither token-proven nor attested
    connections_refused: int = 0  # closed at once: too many handshakes pending on a listener


class PeerStatistics(msgspec.Struct, frozen=True):
    """Chunks and bytes exchanged with one peer, and how its chunks travel."""

    peer: str
    chunks_sent: int
    bytes_sent: int
    chunks_received: int
    bytes_received: int
    transfers_sending: int
    transfers_receiving: int
    placement: str
    transport: str


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


def _registered_pages(memory: KVMemory) -> int:
    return memory.schema.num_layers * memory.schema.kv_planes * memory.num_blocks


def _same_shape(a: KVCacheSchema, b: KVCacheSchema) -> bool:
    fields = ("num_layers", "num_kv_heads", "head_dim", "block_size", "dtype", "kv_planes")
    return all(getattr(a, f) == getattr(b, f) for f in fields)


class KVTransferChannel:
    """Moves KV cache between this process and its peers over one transport.

    ``transport`` is a :class:`Transport` or a registered name (default: ``config.backend``); ``config``
    a :class:`KVTransportConfig` or a ``key=value,...`` string. Use as ``async with``.
    """

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
        self._scheduler = Scheduler(window=self.config.prefetch_depth, max_inflight=self.config.max_inflight)
        self._checksum = checksum_function(self.config.integrity)
        self._checksum_pieces = streaming_checksum_function(self.config.integrity)
        self._counters: collections.Counter[str] = collections.Counter()
        self.telemetry = telemetry if telemetry is not None else Telemetry()
        self._measure = self.config.telemetry
        self._chunk_latency = Histogram()
        self._transfer_seconds = {"sent": Histogram(), "received": Histogram()}
        self._failures: collections.Counter[str] = collections.Counter()
        self.tracer: ChunkTracer | None = None  # set to record every chunk's life (``migrate --trace``)
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
        self._memory_views: list[memoryview] = []
        self._memory_base = np.zeros(0, dtype=np.uint64)  # each registered buffer's address (compiled loops)
        self._placement_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._sessions: dict[str, PeerSession] = {}
        self._listeners: list[Listener] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._outgoing: dict[str, Outgoing] = {}
        self._expect: dict[str, Expectation] = {}
        self._recent: collections.OrderedDict[str, Expectation] = collections.OrderedDict()
        self._attestation: AttestationServer | None = None
        self._open = False
        self._closed = False

    # ---- lifecycle ----------------------------------------------------------------------------------

    async def __aenter__(self) -> KVTransferChannel:
        if self._closed:
            raise ConnectionClosedError(f"channel {self.name} is closed")
        self._open = True
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Fail every open transfer, stop every task, close connections and listeners. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._open = False
        await asyncio.shield(self._shutdown())

    async def _shutdown(self) -> None:
        for listener in self._listeners:
            await listener.aclose()
        for task in list(self._tasks):
            if not task.get_name().startswith("sage-close-"):  # closes run to their end (they are shielded)
                task.cancel()
        for session in list(self._sessions.values()):
            self._end_session(session, ConnectionClosedError(f"channel {self.name} closed"))
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for exp in list(self._expect.values()):
            exp.finish(None, ConnectionClosedError(f"channel {self.name} closed before transfer {exp.transfer_id} arrived"))
        self._expect.clear()
        if self._attestation is not None:
            self._attestation.close()
        if self._placement_pool is not None:
            await asyncio.to_thread(self._placement_pool.shutdown)  # no thread may still read our memory
            self._placement_pool = None
        if self._owns_transport:
            await self.transport.aclose()

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _check_open(self) -> None:
        if not self._open:
            raise ConnectionClosedError(f"channel {self.name} is not open: use `async with KVTransferChannel(...)`")

    # ---- memory and peers ---------------------------------------------------------------------------

    def register(self, memory: KVMemory) -> None:
        """Register this side's KV cache (once). Peers learn its geometry; transfers read or write it in place."""
        if self._memory is not None:
            raise ConfigError(f"channel {self.name} already has KV memory registered")
        if memory.kind not in self.transport.capabilities.memory_kinds:
            kinds = ", ".join(sorted(self.transport.capabilities.memory_kinds))
            raise UnsupportedError(f"transport {self.transport.name!r} moves {kinds} memory, not {memory.kind}")
        self._memory = memory
        self._memory_views = memory.views
        self._memory_base = np.array([buffer_address(view) for view in memory.views], dtype=np.uint64)
        kernels.warm_up_in_background()  # compile the copy loops now rather than inside the first chunk
        for session in self._sessions.values():
            session.post(RegionUpdate(self._region()))  # type: ignore[arg-type]
            if session.peer_invite is not None:  # the peer may now write it directly: present its window
                offer = functools.partial(self._window_for, session.conn)
                with contextlib.suppress(OSError):
                    session.window_offered |= present_to(session.peer_invite, offer)

    # ---- direct placement (same host, CMA) ----------------------------------------------------------

    def _segments(self) -> list[tuple[int, int]]:
        return [(buffer_address(view), view.nbytes) for view in self._memory_views]

    def _window_for(self, conn: Connection, listener: PeerIdentity) -> tuple[Window, list[int]] | None:
        """The window on our memory to hand the process the kernel attests behind a peer's attestation socket
        (:mod:`.attest`), or ``None``: only with direct placement and zero-copy on, to a same-host peer, and,
        without a token, only to a process of this user."""
        config = self.config
        if not (config.direct_placement and config.zero_copy and self._memory is not None and cma_available()):
            return None
        if not conn.link_info().get("same_host"):
            return None
        if config.auth_token is None and listener.uid != os.getuid():
            return None
        fds = self._memory.shared_fds if len(self._memory.shared_fds) == len(self._memory_views) else []
        return Window(host_identity(), [list(seg) for seg in self._segments()], bool(fds)), list(fds)

    def _attestation_server(self) -> AttestationServer | None:
        if self._attestation is None and supported():
            try:
                self._attestation = AttestationServer()
            except OSError as exc:
                log.warning("attestation_unavailable", error=str(exc))
                return None
            self._spawn(self._attestation.serve(), f"sage-attest-{self.name}")
        return self._attestation

    def _worker_pool(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._placement_pool is None:
            self._placement_pool = concurrent.futures.ThreadPoolExecutor(
                max(2, self.config.overlap_streams), thread_name_prefix=f"sage-work-{self.name}"
            )
        return self._placement_pool

    def _placement_failed(self, session: PeerSession, exc: BaseException) -> None:
        self._counters["placement_failures"] += 1
        log.warning("direct_placement_failed", peer=session.peer, error=str(exc), fallback="two-sided sends")

    def _on_presented(self, session: PeerSession, presented: Presented) -> None:
        """A presentation on our attestation socket for this session (at connect time, or later when the peer
        registered its memory): write into the peer's memory from now on, if it handed some over."""
        fds = presented.fds
        try:
            if session.identity is not None and presented.identity.pid != session.identity.pid:
                raise ProtocolError(
                    f"peer {session.peer} presented itself as process {presented.identity.pid}, "
                    f"but the kernel attested process {session.identity.pid} for it"
                )
            window = presented.window
            if window is None or session.closed:
                return
            if not session.trusted:
                self._counters["untrusted_refusals"] += 1
                log.warning("window.refused", peer=session.peer, reason="the peer is neither token-proven nor attested")
                return
            if not self.config.direct_placement or self._memory is None or window.host != host_identity():
                return
            pid, sizes = presented.identity.pid, [n for _, n in window.buffers]
            writer: CmaWriter | ShmWriter | None = None
            if window.shared:
                fds = []  # the writer owns them now
                try:
                    writer = ShmWriter(pid, presented.fds, sizes, self._memory_views)
                except UnsupportedError as exc:
                    log.info("shared_memory_placement_unavailable", peer=session.peer, reason=str(exc), fallback="cma")
            if writer is None:
                try:
                    writer = CmaWriter(pid, [(a, n) for a, n in window.buffers], self._segments())
                    writer.check()
                except UnsupportedError as exc:
                    log.info("direct_placement_unavailable", peer=session.peer, reason=str(exc))
                    return
            session.enable_placement(writer, self._worker_pool())
        except ProtocolError as exc:
            self._session_failed(session, exc)
        finally:
            close_fds(fds)

    def _region(self) -> Region | None:
        return None if self._memory is None else Region(self._memory.schema, self._memory.geometry)

    def _capabilities(self) -> Capabilities:
        return Capabilities(
            integrity=[m.value for m in Integrity],
            memory_kinds=sorted(self.transport.capabilities.memory_kinds),
            max_chunk=self.transport.capabilities.max_message_size,
            codecs=self.accepted_codecs(),
        )

    def accepted_codecs(self) -> list[str]:
        """Wire dtypes and compressions this side decodes and accepts (``accept_codecs`` ∩ what is installed)."""
        accept = self.config.accept_codecs
        if accept == "none":
            return []
        local = local_codecs()
        return sorted(local if accept == "all" else local.intersection(accept.split("+")))

    @property
    def peers(self) -> list[str]:
        return sorted(self._sessions)

    @property
    def memory(self) -> KVMemory | None:
        """The KV memory registered with :meth:`register` (``None`` before)."""
        return self._memory

    def links(self) -> dict[str, dict[str, Any]]:
        """Per peer, what its connection really runs on (``Connection.link_info``: UCX transports in use, ...)."""
        return {
            peer: {**session.conn.link_info(), "placement": session.placement_kind} for peer, session in self._sessions.items()
        }

    async def listen(self, address: str | None = None) -> str:
        """Accept peers at ``address`` (``None``: the transport's host, a free port). Returns the address peers
        connect to. An address other than loopback requires ``auth_token`` (:class:`ConfigError` otherwise)."""
        self._check_open()
        host = address.rsplit(":", 1)[0] if address and ":" in address else getattr(self.transport, "host", None)
        if isinstance(host, str):
            require_token_off_loopback(host, self.config.auth_token, "listen address" if address else "listen_host")
        listener = await self.transport.listen(address)
        self._listeners.append(listener)
        self._spawn(self._accept_loop(listener), f"sage-accept-{listener.address}")
        return listener.address

    async def _accept_loop(self, listener: Listener) -> None:
        pending = [0]  # handshakes in progress on this listener
        while True:
            try:
                conn = await listener.accept()
            except ConnectionClosedError:
                return
            if pending[0] >= self.config.max_pending_handshakes:  # a flood of strangers: each costs a close only
                self._counters["connections_refused"] += 1
                self._spawn(conn.aclose(), "sage-refuse")
                continue
            pending[0] += 1
            self._spawn(self._serve(conn, pending), f"sage-handshake-{conn.peer_address}")

    async def _serve(self, conn: Connection, pending: list[int]) -> None:
        try:
            async with asyncio.timeout(self.config.connect_timeout_s):
                outcome = await server_handshake(
                    conn, name=self.name, token=self.config.auth_token, region=self._region(), known_peers=set(self._sessions),
                    codecs=self.accepted_codecs(),
                )  # fmt: skip
                attestation = await self._authenticated(conn, initiator=False)
        except (SageTransportError, TimeoutError) as exc:
            self._counters["handshake_failures"] += 1
            log.warning("peer.refused", address=conn.peer_address, error=str(exc) or type(exc).__name__)
            await conn.aclose()
            return
        finally:
            pending[0] -= 1
        if outcome.peer_name in self._sessions:  # connected meanwhile under the same name
            self._revoke(attestation)
            await conn.aclose()
            return
        self._start_session(conn, outcome.peer_name, outcome.peer_region, outcome.peer_codecs, attestation)

    async def _authenticated(self, conn: Connection, *, initiator: bool) -> Attestation:
        """After a handshake: lift the connection's pre-authentication limits, then learn from the kernel who the
        peer is and exchange windows (:mod:`.attest`)."""
        await conn.authenticated(MAX_CONTROL_BYTES, self.transport.capabilities.max_message_size)
        offer = functools.partial(self._window_for, conn)
        return await attest_peer(conn, self._attestation_server(), offer, initiator=initiator)

    def _revoke(self, attestation: Attestation) -> None:
        if attestation.nonce is not None and self._attestation is not None:
            self._attestation.revoke(attestation.nonce)
        if attestation.presented is not None:
            close_fds(attestation.presented.fds)

    async def connect(self, address: str) -> str:
        """Connect and authenticate to the channel listening at ``address``; returns the peer's name."""
        self._check_open()
        conn: Connection | None = None
        try:
            async with asyncio.timeout(self.config.connect_timeout_s):
                conn = await self.transport.connect(address)
                outcome = await client_handshake(
                    conn, name=self.name, token=self.config.auth_token, caps=self._capabilities(), region=self._region()
                )
                attestation = await self._authenticated(conn, initiator=True)
        except TimeoutError:
            if conn is not None:
                await conn.aclose()
            raise TransferTimeoutError(f"connecting to {address} took over {self.config.connect_timeout_s}s") from None
        except BaseException:
            if conn is not None:
                await conn.aclose()
            raise
        if outcome.peer_name in self._sessions:
            self._revoke(attestation)
            await conn.aclose()
            raise ConfigError(f"already connected to a peer named {outcome.peer_name!r}")
        self._start_session(conn, outcome.peer_name, outcome.peer_region, outcome.peer_codecs, attestation)
        log.info("peer.connected", peer=outcome.peer_name, address=address)
        return outcome.peer_name

    def _start_session(
        self, conn: Connection, peer: str, region: Region | None, codecs: frozenset[str], attestation: Attestation
    ) -> None:
        session = PeerSession(self, conn, peer, region)
        session.peer_codecs = codecs
        session.identity = attestation.identity
        session.trusted = self.config.auth_token is not None or (
            attestation.identity is not None and attestation.identity.uid == os.getuid()
        )
        session.peer_invite = attestation.peer_invite
        session.attest_nonce = attestation.nonce
        session.window_offered = attestation.offered
        self._sessions[peer] = session
        session.start()
        if attestation.nonce is not None and self._attestation is not None:  # later presentations: this session's
            self._attestation.rebind(attestation.nonce, lambda presented: self._on_presented(session, presented))
        if attestation.presented is not None:
            self._on_presented(session, attestation.presented)

    def _session_failed(self, session: PeerSession, exc: BaseException) -> None:
        """A session's task hit a transport or protocol error: fail its transfers and tear it down."""
        if session.closed:
            return
        busy = bool(session.outgoing or session.incoming)
        if isinstance(exc, ConnectionClosedError) and not busy:
            log.info("peer.closed", peer=session.peer)
        else:
            log.warning("peer.lost", peer=session.peer, error=str(exc), transfers_failed=busy)
        self._end_session(session, exc)

    def _end_session(self, session: PeerSession, cause: BaseException) -> None:
        session.closed = True
        if self._sessions.get(session.peer) is session:
            del self._sessions[session.peer]
            self._scheduler.widen(session.peer, 1)
        if session.attest_nonce is not None and self._attestation is not None:
            self._attestation.revoke(session.attest_nonce)
        if isinstance(cause, ProtocolError):
            self._counters["protocol_errors"] += 1
        kind = PeerDeadError if isinstance(cause, PeerDeadError) else TransportError
        for out in list(session.outgoing.values()):
            acked = out.chunks_verified
            err = kind(
                f"transfer {out.plan.transfer_id} to {session.peer} failed after {acked}/{len(out.table)} "
                f"verified chunks: {cause}"
            )
            self._fail_outgoing(out, err, notify=False)
        for inc in list(session.incoming.values()):
            err = kind(
                f"transfer {inc.transfer_id} from {session.peer} failed with "
                f"{len(inc.table) - inc.remaining}/{len(inc.table)} chunks received: {cause}"
            )
            self._fail_incoming(session, inc, err, notify=False)
        for tid, exp in list(session.pulls.items()):
            self._finish_expectation(exp, None, kind(f"transfer {tid} asked of {session.peer} never started: {cause}"))
        session.pulls.clear()
        for exp, exc, timer in session.fencing.values():
            timer.cancel()
            self._finish_expectation(exp, None, exc)
        session.fencing.clear()
        for tid in [tid for tid, (s, _) in self._deferred_pulls.items() if s is session]:
            del self._deferred_pulls[tid]
        self._spawn(session.close(), f"sage-close-{session.peer}")

    # ---- sending ------------------------------------------------------------------------------------

    def _session_for(self, plan: TransferPlan, doing: str) -> PeerSession:
        """The session a plan runs on, once the plan fits both sides' KV memory (else a ``PlanError`` naming why)."""
        self._check_open()
        tid = plan.transfer_id
        if self._memory is None:
            raise PlanError(f"transfer {tid}: register KV memory with the channel before {doing}")
        session = self._sessions.get(plan.peer)
        if session is None:
            raise PlanError(f"transfer {tid}: peer {plan.peer!r} is not connected (connected: {', '.join(self.peers) or 'none'})")
        if session.region is None:
            raise PlanError(f"transfer {tid}: peer {plan.peer!r} has not registered KV memory")
        for side, schema in (("local", self._memory.schema), (f"peer {plan.peer!r}", session.region.schema)):
            if not _same_shape(plan.schema, schema):
                raise PlanError(f"transfer {tid}: plan schema {plan.schema} does not match the {side} KV memory {schema}")
        return session

    def submit(self, plan: TransferPlan) -> TransferHandle:
        """Plan and queue a transfer; returns at once. ``await handle.wait()`` for the result."""
        session = self._session_for(plan, "sending")
        assert self._memory is not None and session.region is not None
        tid = plan.transfer_id
        if tid in self._outgoing:
            raise PlanError(f"transfer {tid} is already in progress")
        codec = self._codec_for(plan, session)
        submitted = time.perf_counter()
        wire_chunk = chunk_size = min(plan.chunk_size or self.config.chunk_size, self.transport.capabilities.max_message_size)
        if codec is not None:
            # chunk_size is what a message takes on the wire: a quantised chunk holds more stored bytes (fewer,
            # larger chunks: the codec's per-chunk cost is paid less often), cut at whole groups
            if plan.chunk_size is None:
                stored = int(chunk_size * chunk_size / max(1, codec.wire_nbytes(chunk_size)))
                chunk_size = min(stored, self.transport.capabilities.max_message_size)
            if chunk_size < plan.schema.page_bytes:  # pages split into chunks: at whole groups
                chunk_size = max(codec.group_bytes, chunk_size // codec.group_bytes * codec.group_bytes)
        table = plan_chunks(
            plan.schema,
            plan.mappings,
            self._memory.geometry,
            session.region.geometry,
            chunk_size,
            gather=self.config.gather,
            progressive=plan.progressive,
        )
        out = Outgoing(plan, table, session, session.new_wire_id(), submitted)
        if codec is not None:
            out.codec, out.wire_bytes = codec, [0] * len(table)
        session.outgoing[out.wire_id] = out
        self._outgoing[tid] = out
        if self._measure:
            out.sent_at = [0.0] * len(table)
        out.counted = True
        self.telemetry.comm_begin()
        if self.tracer is not None:
            self.tracer.queued(plan.peer, tid, len(table), submitted)
        session.post(
            Announce(
                wire_id=out.wire_id,
                transfer_id=tid,
                schema=plan.schema,
                src_geometry=self._memory.geometry,
                mappings=list(plan.mappings),
                chunk_size=chunk_size,
                gather=self.config.gather,
                progressive=plan.progressive,
                priority=int(plan.priority),
                deadline_s=plan.deadline_s,
                integrity=self.config.integrity.value,
                num_chunks=len(table),
                total_bytes=table.total_bytes,
                digest=table.digest,
                ack_every=max(1, min(self.config.prefetch_depth // 2, 256)),
                wire_dtype=codec.wire_dtype.value if codec is not None and codec.wire_dtype is not None else "",
                group_size=codec.group_size if codec is not None else 0,
                compression=codec.compression.value if codec is not None else "none",
            )
        )
        # the window counts chunks by their size on the wire against chunk_size: the same bytes stay in flight
        cost = min(1.0, codec.wire_nbytes(table.max_chunk_bytes) / wire_chunk) if codec is not None else 1.0
        self._scheduler.add(
            out, plan.peer, len(table), priority=plan.priority,
            layer_ranges=table.layer_chunk_ranges() if plan.progressive else None, cost=max(cost, 1e-3),
        )  # fmt: skip
        deadline = plan.deadline_s or self.config.transfer_timeout_s
        if deadline:
            out.deadline_timer = asyncio.get_running_loop().call_later(deadline, self._on_deadline, out, deadline)
        return TransferHandle(out)

    def _codec_for(self, plan: TransferPlan, session: PeerSession) -> ChunkCodec | None:
        """The wire codec of a new transfer (``None``: chunks go as stored), checked against what the peer accepts."""
        tid, stored = plan.transfer_id, plan.schema.dtype
        wire = plan.target_dtype or self.config.target_dtype
        if wire == stored:
            wire = None
        if wire is not None and wire not in QUANTISED:
            choices = ", ".join(d.value for d in QUANTISED)
            raise UnsupportedError(
                f"transfer {tid}: target_dtype={wire.value} is neither the stored {stored.value} nor a quantised wire dtype "
                f"({choices})"
            )
        compression = self.config.compression
        if wire is None and compression is Compression.NONE:
            return None
        wanted = [n for n in (wire.value if wire else "", "" if compression is Compression.NONE else compression.value) if n]
        missing = [n for n in wanted if n not in session.peer_codecs]
        if self.config.codec_policy == "auto":  # only where both ends can run it and the link is slower than the codec
            if missing or not local_codecs().issuperset(wanted) or not self._codec_pays(session, wire, compression):
                return None
        if missing:
            accepts = ", ".join(sorted(session.peer_codecs)) or "only KV as stored"
            raise UnsupportedError(
                f"transfer {tid}: peer {session.peer!r} does not decode {' and '.join(missing)} (it accepts: {accepts}); "
                "send as stored (target_dtype=none, compression=none) or install the codec there"
            )
        try:
            return ChunkCodec(stored, wire, self.config.codec_group_size, compression)
        except ConfigError as exc:
            raise UnsupportedError(f"transfer {tid}: {exc}") from None

    def _codec_pays(self, session: PeerSession, wire: DType | None, compression: Compression) -> bool:
        """``codec_policy=auto``: the codec only where it makes transfers faster. Same-host peers (shared memory,
        CMA, loopback) and RDMA / NVLink lanes are faster than any CPU codec. On other links it is measured: each
        large transfer (8 MiB and more) records its rate with the codec or without; once both are known the faster
        one is used, and every ``_AUTO_REPROBE``-th choice measures the other again (links and loads change). Before
        that, the codec goes first where the link (if measured) is slower than the codec encodes, and a link known
        only with the codec is measured once without it."""
        link = session.conn.link_info()
        if link.get("same_host"):
            return False
        lanes = {lane.split("/")[0] for lanes in (link.get("ucx_transports") or {}).values() for lane in lanes}
        if any(lane.startswith(("rc", "dc", "ud", "cuda", "gdr")) for lane in lanes):
            return False
        raw, coded = session.rates.get(_RAW), session.rates.get(_choice(wire, compression))
        session.auto_choices += 1
        if raw is not None and coded is not None:
            faster = coded > raw
            return not faster if session.auto_choices % _AUTO_REPROBE == 0 else faster
        if coded is not None:
            return False  # measure the link without the codec once
        if raw is None:
            return True
        threads = max(1, min(self.config.overlap_streams, os.cpu_count() or 1))
        return raw < codec_throughput(wire, compression) * threads

    async def transfer(self, plan: TransferPlan) -> TransferResult:
        """Send ``plan`` and return once the receiver verified every chunk. Cancelling this call aborts the
        transfer at both ends."""
        handle = self.submit(plan)
        try:
            return await handle.wait()
        except asyncio.CancelledError:
            handle.cancel("the awaiting task was cancelled")
            raise

    async def pull(self, plan: TransferPlan) -> TransferResult:
        """Ask peer ``plan.peer`` to send ``plan`` to us (``src_blocks`` are the peer's, ``dst_blocks`` ours) and
        return once every chunk arrived here and was verified: the receiver-initiated transfer a decode instance
        uses to fetch a prefill's KV. The peer must allow it (``allow_pull``); a refusal raises
        :class:`TransferAbortedError` with the peer's reason, a missed ``deadline_s`` :class:`TransferTimeoutError`.
        Cancelling this call aborts the transfer at both ends."""
        session = self._session_for(plan, "pulling into it")
        tid = plan.transfer_id
        exp = self._expect.get(tid)
        if tid in session.pulls or (exp is not None and exp.announced) or tid in self._recent:
            raise PlanError(f"transfer {tid} is already being received or was received; pull it under a new id")
        exp = self._expectation(tid)
        session.pulls[tid] = exp
        session.pull_destinations[tid] = sorted((m.layer_start, m.layer_stop, m.dst_blocks) for m in plan.mappings)
        wire = plan.target_dtype.value if plan.target_dtype is not None else ""
        session.post(Pull(tid, plan.schema, list(plan.mappings), int(plan.priority), plan.deadline_s, wire))
        try:
            async with asyncio.timeout(plan.deadline_s):
                return await self.wait_received(tid)
        except TimeoutError:
            err = TransferTimeoutError(f"transfer {tid} pulled from {plan.peer} missed its {plan.deadline_s:g}s deadline")
            self._abandon_pull(session, tid, err)
            if not exp.done.done():  # the sender may be writing our memory directly: wait for its fence
                with contextlib.suppress(BaseException):
                    async with asyncio.timeout(self.config.ack_timeout_s + 1):
                        await asyncio.shield(exp.done)
            raise err from None
        except asyncio.CancelledError:
            self._abandon_pull(session, tid, TransferAbortedError(f"transfer {tid} pulled from {plan.peer}: cancelled"))
            raise

    def _abandon_pull(self, session: PeerSession, tid: str, exc: BaseException) -> None:
        exp = session.pulls.pop(tid, None)
        session.pull_destinations.pop(tid, None)
        for inc in list(session.incoming.values()):
            if inc.transfer_id == tid:  # announced: abort it at the sender too
                self._fail_incoming(session, inc, exc, notify=True)
                return
        if exp is not None:
            self._finish_expectation(exp, None, exc)

    def _on_pull(self, session: PeerSession, msg: Pull) -> None:
        """A peer asks for a transfer of our KV: submit it to that peer (through :attr:`pull_resolver` when set),
        or refuse with the reason."""
        if not self.config.allow_pull:
            return self._refuse_pull(session, msg.transfer_id, "pulls are refused here (allow_pull=false)")
        if not session.trusted:
            self._counters["untrusted_refusals"] += 1
            return self._refuse_pull(session, msg.transfer_id, _UNTRUSTED)
        if self._memory is not None:
            pages, registered = _plan_pages(msg.schema, msg.mappings), _registered_pages(self._memory)
            if pages > registered:
                return self._refuse_pull(session, msg.transfer_id, f"{pages} pages asked for, {registered} registered here")
            active = len(session.outgoing) + sum(1 for asker, _ in self._deferred_pulls.values() if asker is session)
            if active >= _MAX_PULLS_PER_PEER:
                return self._refuse_pull(session, msg.transfer_id, f"{active} transfers already asked for by {session.peer}")
        try:
            plan = TransferPlan(
                transfer_id=msg.transfer_id, peer=session.peer, schema=msg.schema, mappings=tuple(msg.mappings),
                priority=Priority.parse(msg.priority), deadline_s=msg.deadline_s,
                target_dtype=DType.parse(msg.target_dtype, "target_dtype") if msg.target_dtype else None,
            )  # fmt: skip
            if self.pull_resolver is not None:
                if msg.transfer_id in self._deferred_pulls or msg.transfer_id in self._outgoing:
                    raise PlanError(f"transfer {msg.transfer_id} is already asked for or being sent")
                self._deferred_pulls[msg.transfer_id] = (session, plan)
                try:
                    resolved = self.pull_resolver(session.peer, plan)
                except SageTransportError:
                    raise
                except Exception as exc:  # the application's bug must not end the session
                    log.exception("pull.resolver_failed", transfer_id=msg.transfer_id, peer=session.peer)
                    raise PlanError(f"the pull resolver failed: {type(exc).__name__}: {exc}") from exc
                if resolved is not None and msg.transfer_id in self._deferred_pulls:
                    with contextlib.suppress(SageTransportError):  # serve_pull refused it with the reason
                        self.serve_pull(msg.transfer_id, resolved)
                return None  # served, deferred, or served or refused by the resolver itself
            self.submit(plan)
            self._counters["pulls_served"] += 1
        except SageTransportError as exc:
            self._deferred_pulls.pop(msg.transfer_id, None)
            self._refuse_pull(session, msg.transfer_id, str(exc))
        return None

    def _refuse_pull(self, session: PeerSession, transfer_id: str, reason: str) -> None:
        self._counters["transfers_refused"] += 1
        session.post(PullRefused(transfer_id, f"refused by {self.name}: {reason}"[:1024]))
        log.warning("pull.refused", transfer_id=transfer_id, peer=session.peer, reason=reason)

    @property
    def deferred_pulls(self) -> dict[str, TransferPlan]:
        """Pulls peers asked for that :attr:`pull_resolver` deferred, by transfer id (the plans as asked)."""
        return {tid: plan for tid, (_, plan) in self._deferred_pulls.items()}

    def serve_pull(self, transfer_id: str, plan: TransferPlan | None = None) -> TransferHandle:
        """Send a deferred pull: ``plan`` (default: as the peer asked) must keep its transfer id, peer and
        destination blocks; its source blocks, priority and ``progressive`` are ours to choose."""
        entry = self._deferred_pulls.pop(transfer_id, None)
        if entry is None:
            raise PlanError(f"no pull of transfer {transfer_id} is waiting here")
        session, asked = entry
        plan = plan or asked
        try:
            if (plan.transfer_id, plan.peer) != (asked.transfer_id, asked.peer):
                raise PlanError(
                    f"pull {transfer_id}: served as transfer {plan.transfer_id} to {plan.peer}, "
                    f"asked as {asked.transfer_id} by {asked.peer}"
                )
            destinations = sorted((m.layer_start, m.layer_stop, m.dst_blocks) for m in plan.mappings)
            if destinations != sorted((m.layer_start, m.layer_stop, m.dst_blocks) for m in asked.mappings):
                raise PlanError(f"pull {transfer_id}: the plan served writes other destination blocks than the peer asked for")
            handle = self.submit(plan)
        except SageTransportError as exc:
            if not session.closed:
                self._refuse_pull(session, transfer_id, str(exc))
            raise
        self._counters["pulls_served"] += 1
        return handle

    def refuse_pull(self, transfer_id: str, reason: str) -> None:
        """Refuse a deferred pull; the peer's ``pull`` raises :class:`TransferAbortedError` with ``reason``."""
        entry = self._deferred_pulls.pop(transfer_id, None)
        if entry is not None and not entry[0].closed:
            self._refuse_pull(entry[0], transfer_id, reason)

    def _on_pull_refused(self, session: PeerSession, msg: PullRefused) -> None:
        exp = session.pulls.pop(msg.transfer_id, None)
        session.pull_destinations.pop(msg.transfer_id, None)
        if exp is not None:
            err = TransferAbortedError(f"peer {session.peer} will not send transfer {msg.transfer_id}: {msg.reason}")
            self._counters["transfers_failed"] += 1
            self._failures[type(err).__name__] += 1
            self._finish_expectation(exp, None, err)

    def mark_layer_ready(self, transfer_id: str, layers: int | Iterable[int]) -> None:
        """Layers of a progressive transfer are final: their chunks may go."""
        out = self._outgoing.get(transfer_id)
        if out is None:
            raise PlanError(f"transfer {transfer_id} is not being sent by channel {self.name}")
        self._mark_ready(out, (layers,) if isinstance(layers, int) else layers)

    def _mark_ready(self, out: Outgoing, layers: Iterable[int]) -> None:
        if out.future.done() or not out.plan.progressive:
            return
        woke = False
        for layer in layers:
            try:
                woke |= self._scheduler.mark_layer_ready(out, layer)
            except IndexError:
                raise PlanError(
                    f"transfer {out.plan.transfer_id}: layer {layer} is outside 0..{out.plan.schema.num_layers - 1}"
                ) from None
        if woke:
            out.session.wake.set()

    def _on_deadline(self, out: Outgoing, deadline: float) -> None:
        acked = out.chunks_verified
        self._fail_outgoing(
            out,
            TransferTimeoutError(
                f"transfer {out.plan.transfer_id} to {out.session.peer} missed its {deadline:g}s deadline with "
                f"{acked}/{len(out.table)} chunks verified"
            ),
            notify=True,
        )

    def _cancel_outgoing(self, out: Outgoing, reason: str) -> None:
        self._fail_outgoing(
            out, TransferAbortedError(f"transfer {out.plan.transfer_id} to {out.session.peer}: {reason}"), notify=True
        )

    def cancel(self, transfer_id: str, reason: str = "cancelled by the caller") -> bool:
        """Abort a transfer this channel sends or receives; the peer is told. False if unknown."""
        out = self._outgoing.get(transfer_id)
        if out is not None:
            self._cancel_outgoing(out, reason)
            return True
        for session in self._sessions.values():
            for inc in session.incoming.values():
                if inc.transfer_id == transfer_id:
                    self._fail_incoming(
                        session, inc, TransferAbortedError(f"transfer {transfer_id} from {session.peer}: {reason}"), notify=True
                    )
                    return True
        return False

    def _on_ack(self, session: PeerSession, out: Outgoing, seqs: list[int]) -> None:
        scheduler = self._scheduler
        was_full = scheduler.inflight() >= scheduler.max_inflight
        nbytes = out.lists["chunk_nbytes"]
        out.accepted = True
        sent_at = out.sent_at
        now = time.perf_counter() if sent_at is not None or self.tracer is not None else 0.0
        for seq in seqs:
            outcome = scheduler.ack(out, seq)
            if outcome is AckOutcome.DUPLICATE:
                continue
            if sent_at is not None:
                self._chunk_latency.observe(now - sent_at[seq])
            if self.tracer is not None:
                self.tracer.acked(session.peer, out.plan.transfer_id, seq, now)
            out.bytes_verified += nbytes[seq]
            out.chunks_verified += 1
            if outcome is AckOutcome.COMPLETE:
                self._complete_outgoing(out)
                break
        session.wake.set()
        if was_full:
            for other in self._sessions.values():
                other.wake.set()

    def _on_nack(self, session: PeerSession, out: Outgoing, seq: int, attempt: int) -> None:
        if not 0 <= seq < len(out.attempts) or min(attempt + 1, 255) != out.attempts[seq]:
            # stale: about an attempt we already sent again (its ack was late), or one never sent. Acting on it
            # would free the window slot of the copy still in flight and count a retry twice
            self._counters["stale_messages"] += 1
            return
        bad = out.bad_copies = out.bad_copies or {}
        failures, last = bad.get(seq, (0, -1))
        if last == attempt:  # the same copy NACKed twice (it arrived twice): one failure, one resend
            self._counters["stale_messages"] += 1
            return
        out.retries += 1
        self._counters["retries"] += 1
        failures += 1  # copies resent only because an ack was late do not count
        bad[seq] = (failures, attempt)
        if failures > self.config.max_retries:
            self._fail_outgoing(
                out,
                ChecksumError(
                    f"chunk {seq} of transfer {out.plan.transfer_id} to {session.peer} failed its checksum "
                    f"{failures} times (max_retries={self.config.max_retries})"
                ),
                notify=True,
            )
            return
        if self._scheduler.resend(out, seq):
            session.wake.set()

    def _release_outgoing(self, out: Outgoing) -> None:
        if out.counted:
            out.counted = False
            self.telemetry.comm_end()
        self._scheduler.remove(out)
        out.session.outgoing.pop(out.wire_id, None)
        if self._outgoing.get(out.plan.transfer_id) is out:
            del self._outgoing[out.plan.transfer_id]

    def _complete_outgoing(self, out: Outgoing) -> None:
        self._release_outgoing(out)
        now = time.perf_counter()
        loop_now = asyncio.get_running_loop().time()
        wall = now - out.submitted_at
        sent_for = loop_now - out.first_send_at if out.first_send_at else 0.0
        codec = out.codec
        total = out.table.total_bytes
        if total >= _AUTO_MIN_BYTES and sent_for > 0:  # what codec_policy=auto decides by
            key = _RAW if codec is None else _choice(codec.wire_dtype, codec.compression)
            out.session.rates[key] = total / sent_for
        result = TransferResult(
            transfer_id=out.plan.transfer_id,
            peer=out.session.peer,
            bytes=total,
            wire_bytes=sum(out.wire_bytes) if out.wire_bytes is not None else total,
            kv_dtype=(codec.wire_dtype or codec.stored).value if codec is not None else out.plan.schema.dtype.value,
            compression=codec.compression.value if codec is not None else "none",
            chunks=len(out.table),
            wall_s=wall,
            retries=out.retries,
            integrity=IntegrityStatus.UNCHECKED if self._checksum is None else IntegrityStatus.VERIFIED,
            phases={
                "plan_s": out.planned_at - out.submitted_at,
                "queue_s": max(0.0, wall - sent_for - (out.planned_at - out.submitted_at)),
                "transfer_s": sent_for,
            },
        )
        self._counters["transfers_completed"] += 1
        if self._measure:
            self._transfer_seconds["sent"].observe(wall)
            self.telemetry.recent_transfer_seconds.append(wall)
        out.finish(result, None)
        if self.on_sent is not None:
            self.on_sent(result.transfer_id, result, None)
        log.info(
            "transfer.sent", transfer_id=result.transfer_id, peer=result.peer, bytes=result.bytes, chunks=result.chunks,
            seconds=round(wall, 6), gbps=round(result.gbps, 3), retries=result.retries,
        )  # fmt: skip

    def _fail_outgoing(self, out: Outgoing, exc: BaseException, *, notify: bool) -> None:
        if out.future.done():
            return
        out.stopped = True  # placement threads start no further write of it
        self._release_outgoing(out)
        if notify and not out.session.closed:
            self._post_when_fenced(out, Abort(out.wire_id, True, str(exc)[:1024]))
        self._counters["transfers_failed"] += 1
        self._failures[type(exc).__name__] += 1
        out.finish(None, exc)
        if self.on_sent is not None:
            self.on_sent(out.plan.transfer_id, None, exc)
        log.warning("transfer.failed", transfer_id=out.plan.transfer_id, peer=out.session.peer, error=str(exc))

    def _post_when_fenced(self, out: Outgoing, message: Abort | Fence) -> None:
        """Post ``message`` once no direct write of ``out`` runs (at once when none does): the receiver may
        reuse the blocks of an aborted transfer as soon as it reads it."""
        if out.placing:
            out.fence_pending = message
        else:
            out.session.post(message)

    def _on_fence(self, session: PeerSession, wire_id: int) -> None:
        entry = session.fencing.pop(wire_id, None)
        if entry is not None:
            exp, exc, timer = entry
            timer.cancel()
            self._finish_expectation(exp, None, exc)

    def _fence_late(self, session: PeerSession, wire_id: int) -> None:
        entry = session.fencing.pop(wire_id, None)
        if entry is not None:
            tid, waited = entry[0].transfer_id, self.config.ack_timeout_s
            log.warning("transfer.fence_late", peer=session.peer, transfer_id=tid, waited_s=waited)
            self._finish_expectation(entry[0], None, entry[1])

    # ---- receiving ----------------------------------------------------------------------------------

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
            hash_in_place=mode is Integrity.XXH3 and kernels.AVAILABLE,
            ack_every=msg.ack_every,
            peer=session.peer,
        )
        inc.codec = codec
        inc.pages = pages
        session.incoming_pages += pages
        session.max_wire_id_in = max(session.max_wire_id_in, msg.wire_id)
        largest = table.max_chunk_bytes
        session.max_incoming_chunk = max(session.max_incoming_chunk, codec.bound(largest) if codec is not None else largest)
        self.telemetry.comm_begin()
        if session.window_offered and codec is None:  # a same-host writer may place every chunk from now on
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
        if inc.deadline_timer is not None:
            inc.deadline_timer.cancel()
        wall = time.perf_counter() - inc.expectation.started_at
        codec = inc.codec
        result = TransferResult(
            transfer_id=inc.transfer_id,
            peer=session.peer,
            bytes=inc.table.total_bytes,
            wire_bytes=inc.wire_bytes if codec is not None else inc.table.total_bytes,
            kv_dtype=(codec.wire_dtype or codec.stored).value if codec is not None else inc.table.schema.dtype.value,
            compression=codec.compression.value if codec is not None else "none",
            chunks=len(inc.table),
            wall_s=wall,
            retries=inc.bad_chunks,
            integrity=IntegrityStatus.UNCHECKED if inc.checksum is None else IntegrityStatus.VERIFIED,
            phases={"transfer_s": wall},
        )
        self._counters["transfers_received"] += 1
        if self._measure:
            self._transfer_seconds["received"].observe(wall)
        self._finish_expectation(inc.expectation, result, None)
        log.info(
            "transfer.received", transfer_id=inc.transfer_id, peer=session.peer, bytes=result.bytes,
            chunks=result.chunks, seconds=round(wall, 6), bad_chunks=inc.bad_chunks,
        )  # fmt: skip

    def _fail_incoming(self, session: PeerSession, inc: Incoming, exc: BaseException, *, notify: bool) -> None:
        if session.incoming.pop(inc.wire_id, None) is None:
            return
        self.telemetry.comm_end()
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
        self._finish_expectation(inc.expectation, None, exc)

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

    # ---- statistics ---------------------------------------------------------------------------------

    def statistics(self) -> ChannelStatistics:
        c = self._counters
        sched = self._scheduler.statistics()
        return ChannelStatistics(
            name=self.name,
            peers=self.peers,
            transfers_sending=len(self._outgoing),
            transfers_receiving=sum(len(s.incoming) for s in self._sessions.values()),
            transfers_completed=c["transfers_completed"] + c["transfers_received"],
            transfers_failed=c["transfers_failed"],
            chunks_sent=c["chunks_sent"],
            chunks_received=c["chunks_received"],
            bytes_sent=c["bytes_sent"],
            bytes_received=c["bytes_received"],
            retries=c["retries"] + c["resends_after_timeout"],
            checksum_failures=c["checksum_failures"],
            duplicates=c["duplicates"],
            stale_messages=c["stale_messages"],
            protocol_errors=c["protocol_errors"],
            internal_errors=c["internal_errors"],
            untrusted_refusals=c["untrusted_refusals"],
            connections_refused=c["connections_refused"],
            inflight_chunks=sched.inflight,
            queued_chunks=sched.queued_chunks,
            handshake_failures=c["handshake_failures"],
            transfers_refused=c["transfers_refused"],
            chunks_placed=c["chunks_placed"],
            placement_failures=c["placement_failures"],
            inflight_bytes=sum(max(0, out.bytes_sent - out.bytes_verified) for out in self._outgoing.values()),
            failures_by_kind=dict(self._failures),
        )

    def peer_statistics(self) -> list[PeerStatistics]:
        """Per connected peer: chunks and bytes each way, transfers in progress, placement and transport."""
        out = []
        for peer, session in self._sessions.items():
            c = session.counters
            out.append(
                PeerStatistics(
                    peer=peer, chunks_sent=c["chunks_sent"], bytes_sent=c["bytes_sent"], chunks_received=c["chunks_received"],
                    bytes_received=c["bytes_received"], transfers_sending=len(session.outgoing),
                    transfers_receiving=len(session.incoming), placement=session.placement_kind, transport=self.transport.name,
                )
            )  # fmt: skip
        return out

    def histograms(self) -> dict[str, HistogramSnapshot]:
        """``chunk_latency_seconds`` (send start to acknowledgement) and transfer durations (``sent``,
        ``received``), kept while ``config.telemetry`` is on."""
        return {
            "chunk_latency_seconds": self._chunk_latency.snapshot(),
            "transfer_sent_seconds": self._transfer_seconds["sent"].snapshot(),
            "transfer_received_seconds": self._transfer_seconds["received"].snapshot(),
        }

    # ---- control --------------------------------------------------------------------------------------

    #: Settings :meth:`reconfigure` changes on a live channel.
    LIVE_SETTINGS = ("chunk_size", "prefetch_depth", "max_inflight", "overlap_streams", "ack_timeout_s", "telemetry")

    def reconfigure(self, **changes: Any) -> KVTransportConfig:
        """Change settings of a live channel (validated like any configuration; unknown or not-live keys are a
        ``ConfigError``). The window (``prefetch_depth``), ``max_inflight`` and ``overlap_streams`` apply at once,
        also to transfers in flight; ``ack_timeout_s`` from every session's next wait for acknowledgements;
        ``chunk_size`` applies to transfers submitted from now on (a transfer in flight keeps the chunk table both
        sides agreed on)."""
        for key in changes:
            if key not in self.LIVE_SETTINGS:
                raise ConfigError(f"{key!r} cannot change on a live channel; live settings: {', '.join(self.LIVE_SETTINGS)}")
        config = self.config.replace(**changes)
        self.config = config
        self._scheduler.set_limits(window=config.prefetch_depth, max_inflight=config.max_inflight)
        self._measure = config.telemetry
        for session in self._sessions.values():
            session.set_overlap(config.overlap_streams)
            session.wake.set()
        log.info("channel.reconfigured", channel=self.name, **{k: getattr(config, k) for k in changes})
        return config
