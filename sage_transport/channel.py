"""``KVTransferChannel``: register KV memory once, connect peers, ``await channel.transfer(plan)``.

The channel plans (:mod:`.planner`), schedules (:mod:`.scheduler`) and drives one
:class:`~sage_transport.session.PeerSession` per peer over any :class:`~sage_transport.transports.base.Transport`.
It knows nothing of a particular transport. ``transfer`` returns when the receiver verified every chunk;
the receiver awaits the same transfer with :meth:`wait_received` or iterates :meth:`arrivals`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Iterable
from types import TracebackType
from typing import Any

import numpy as np

from . import kernels
from .attest import present_to
from .channel_core import (
    log,
)
from .channel_peers import PeerManagement
from .channel_pulls import PullSide
from .channel_receiving import ReceivingSide
from .channel_sending import SendingSide
from .channel_stats import ChannelStatistics, PeerStatistics, StatisticsView
from .config import Compression, KVTransportConfig, canonical_key
from .errors import (
    ConfigError,
    ConnectionClosedError,
    PlanError,
    TransferAbortedError,
    UnsupportedError,
)
from .memory import KVMemory
from .placement import buffer_address
from .plan import TransferPlan, TransferResult
from .planner import plan_chunks
from .transfers import Outgoing, TransferHandle
from .wire import Announce, RegionUpdate

__all__ = ["ChannelStatistics", "KVTransferChannel", "PeerStatistics"]


class KVTransferChannel(PeerManagement, SendingSide, ReceivingSide, PullSide, StatisticsView):
    """Moves KV cache between this process and its peers over one transport.

    ``transport`` is a :class:`Transport` or a registered name (default: ``config.backend``); ``config``
    a :class:`KVTransportConfig` or a ``key=value,...`` string. Use as ``async with``.
    """

    async def __aenter__(self) -> KVTransferChannel:
        if self._closed:
            raise ConnectionClosedError(f"channel {self.name} is closed")
        self._open = True
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    @property
    def closed(self) -> bool:
        """Whether :meth:`aclose` was called (a published registration withdraws itself then)."""
        return self._closed

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

    def register(self, memory: KVMemory) -> None:
        """Register this side's KV cache (once). Peers learn its geometry; transfers read or write it in place."""
        if self._memory is not None:
            raise ConfigError(f"channel {self.name} already has KV memory registered")
        if memory.kind == "cuda":  # device KV: moved on the device, through any transport (staged) or UCX's cuda_copy
            self._register_device(memory)
        elif memory.kind not in self.transport.capabilities.memory_kinds:
            kinds = ", ".join(sorted(self.transport.capabilities.memory_kinds))
            raise UnsupportedError(f"transport {self.transport.name!r} moves {kinds} memory, not {memory.kind}")
        self._memory = memory
        self._memory_views = memory.views
        self._memory_base = np.array([buffer_address(view) for view in memory.views], dtype=np.uint64)
        self._host.views, self._host.bases = self._memory_views, self._memory_base
        if self._device is None:
            kernels.warm_up_in_background()  # compile the copy loops now rather than inside the first chunk
        for session in self._sessions.values():
            session.post(RegionUpdate(self._region()))  # type: ignore[arg-type]
            if session.peer_invite is not None:  # the peer may now write it directly: present its window
                offer = functools.partial(self._window_for, session.conn)
                with contextlib.suppress(OSError):
                    session.window_offered |= present_to(session.peer_invite, offer)

    def _register_device(self, memory: KVMemory) -> None:
        from .device import CudaRuntime, DeviceKV

        if self.config.compression is not Compression.NONE and self.config.codec_policy == "always":
            raise ConfigError(
                f"compression={self.config.compression.value} runs on the host; device KV is quantised on the device "
                "(target_dtype=fp8_e4m3, int8, int4) or sent as stored (compression=none)"
            )
        if memory.runtime is None:
            memory.runtime = CudaRuntime(memory.device)
        device = DeviceKV(memory.buffers, memory.schema.page_bytes, memory.runtime)
        device.shared_fds = memory.shared_fds
        self._device = self._host.device = device
        self._host.device_wire = memory.runtime.name == "cuda" and "cuda" in self.transport.capabilities.memory_kinds

    @property
    def memory(self) -> KVMemory | None:
        """The KV memory registered with :meth:`register` (``None`` before)."""
        return self._memory

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
        integrity, out.checksum = self._checksum_for(session)
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
        announce = Announce(
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
            integrity=integrity.value,
            num_chunks=len(table),
            total_bytes=table.total_bytes,
            digest=table.digest,
            ack_every=max(1, min(self.config.peer_window // 2, 256)),
            wire_dtype=codec.wire_dtype.value if codec is not None and codec.wire_dtype is not None else "",
            group_size=codec.group_size if codec is not None else 0,
            compression=codec.compression.value if codec is not None else "none",
        )
        if len(table) == 1 and codec is None and not plan.progressive:
            out.announce = announce  # goes as the header of the chunk itself: one frame, one round trip
            session.wake.set()
        else:
            session.post(announce)
        # the window counts chunks by their size on the wire against chunk_size: the same bytes stay in flight
        cost = min(1.0, codec.wire_nbytes(table.max_chunk_bytes) / wire_chunk) if codec is not None else 1.0
        self._scheduler.add(
            out, plan.peer, len(table), priority=plan.priority,
            layer_ranges=table.layer_chunk_ranges() if plan.progressive else None, cost=max(cost, 1e-3),
        )  # fmt: skip
        deadline = plan.deadline_s or self.config.transfer_timeout_s
        if deadline:
            out.deadline_timer = asyncio.get_running_loop().call_later(deadline, self._on_deadline, out, deadline)
        return TransferHandle(out, self._mark_ready, self._cancel_outgoing)

    async def transfer(self, plan: TransferPlan) -> TransferResult:
        """Send ``plan`` and return once the receiver verified every chunk. Cancelling this call aborts the
        transfer at both ends."""
        handle = self.submit(plan)
        try:
            return await handle.wait()
        except asyncio.CancelledError:
            handle.cancel("the awaiting task was cancelled")
            raise

    def mark_layer_ready(self, transfer_id: str, layers: int | Iterable[int], event: Any = None) -> None:
        """Layers of a progressive transfer are final: their chunks may go. With ``event`` (a CUDA event the engine
        recorded on its compute stream after writing them) they go once it has fired: the loop polls it, no
        thread waits and the compute stream is never synchronised."""
        out = self._outgoing.get(transfer_id)
        if out is None:
            raise PlanError(f"transfer {transfer_id} is not being sent by channel {self.name}")
        ready = (layers,) if isinstance(layers, int) else tuple(layers)
        if event is None:
            self._mark_ready(out, ready)
            return
        if not callable(getattr(event, "query", None)):
            raise PlanError(f"event={event!r} has no query(): pass a torch.cuda.Event recorded on the compute stream")
        self._mark_ready_after(out, ready, event)

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

    LIVE_SETTINGS = ("chunk_size", "peer_window", "max_inflight", "send_lanes", "ack_timeout_s", "telemetry")

    def reconfigure(self, **changes: Any) -> KVTransportConfig:
        """Change settings of a live channel (validated like any configuration; unknown or not-live keys are a
        ``ConfigError``). The window (``peer_window``), ``max_inflight`` and ``send_lanes`` apply at once,
        also to transfers in flight; ``ack_timeout_s`` from every session's next wait for acknowledgements;
        ``chunk_size`` applies to transfers submitted from now on (a transfer in flight keeps the chunk table both
        sides agreed on)."""
        changes = {canonical_key(key): value for key, value in changes.items()}  # old names too (KEY_ALIASES)
        for key in changes:
            if key not in self.LIVE_SETTINGS:
                raise ConfigError(f"{key!r} cannot change on a live channel; live settings: {', '.join(self.LIVE_SETTINGS)}")
        config = self.config.replace(**changes)
        self.config = self._host.config = config
        self._scheduler.set_limits(window=config.peer_window, max_inflight=config.max_inflight)
        self._measure = config.telemetry
        for session in self._sessions.values():
            session.set_send_lanes(config.send_lanes)
            session.wake.set()
        log.info("channel.reconfigured", channel=self.name, **{k: getattr(config, k) for k in changes})
        return config
