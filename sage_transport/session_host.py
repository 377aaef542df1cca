"""What a :class:`~sage_transport.session.PeerSession` is given by the channel that owns it: :class:`SessionHost`.

A session never imports the channel. It reads the shared state it needs here (configuration, scheduler,
counters, registered memory, checksums, tracer) and reports back through six callbacks: a control message
arrived, a session or its direct placement failed, an incoming transfer completed, a transfer failed. The
channel builds one host and keeps its fields current (``reconfigure``, ``register``, ``tracer``), so every
session sees a change at its next read.

A chunk crosses the seam once each way: the session's writer takes it from :attr:`SessionHost.scheduler`, and
its acknowledgement comes back through :attr:`SessionHost.on_control`.
"""

from __future__ import annotations

import collections
import concurrent.futures
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import KVTransportConfig
from .scheduler import Scheduler
from .transfers import Incoming

if TYPE_CHECKING:
    from .telemetry.trace import ChunkTracer

__all__ = ["SessionHost"]


@dataclass(eq=False, slots=True)
class SessionHost:
    """The channel as its sessions see it: shared state (kept current by the channel) and callbacks.

    ``on_control(session, message)`` takes every control message a session does not handle itself
    (acknowledgements, announcements, aborts, fences, pulls); ``session_failed(session, exc)`` ends a session;
    ``placement_failed(session, exc)`` is told when writing a peer's memory failed (the session falls back to
    sending); ``incoming_complete(session, incoming)`` when every chunk of an incoming transfer is verified;
    ``landed(incoming)`` when the last payload landing in an ended transfer's pages on a lane is in (it ends now);
    ``fail_outgoing(out, exc, notify=)`` and ``fail_incoming(session, incoming, exc, notify=)`` end one transfer
    (and tell the peer when ``notify``). A callback's first argument is the
    :class:`~sage_transport.session.PeerSession` reporting."""

    config: KVTransportConfig
    scheduler: Scheduler
    counters: collections.Counter[str]
    checksum: Callable[[Any], int] | None
    checksum_pieces: Callable[[list[memoryview]], int] | None
    worker_pool: Callable[[], concurrent.futures.Executor]
    on_control: Callable[[Any, Any], None]
    session_failed: Callable[[Any, BaseException], None]
    placement_failed: Callable[[Any, BaseException], None]
    incoming_complete: Callable[[Any, Incoming], None]
    fail_outgoing: Callable[..., None]
    fail_incoming: Callable[..., None]
    landed: Callable[[Incoming], None]
    #: the registered KV memory: one view per buffer, and each buffer's address (for the compiled loops)
    views: list[memoryview] = field(default_factory=list)
    bases: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint64))
    tracer: ChunkTracer | None = None
    #: device KV (:class:`~sage_transport.device.DeviceKV`) when the registered memory is on a device, and whether
    #: the transport moves device memory itself (else chunks are staged through pinned host memory)
    device: Any = None
    device_wire: bool = False
