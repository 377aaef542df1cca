"""The in-memory transport: a first-class peer for tests, benches and the CLI's ``--transport mock``.

A :class:`MockNetwork` is the fabric endpoints share (no global state: pass one network to every
:class:`MockTransport` that must reach the others). It models a link with ``latency_s`` and
``bandwidth_Bps`` (each connection's own), an endpoint's incoming link shared by all its senders with
``ingress_Bps`` (fan-in contention), and, like UCX, sends small payloads eagerly (copied at send time) and large ones by
rendezvous (the receiver copies straight from the sender's buffer into its sink, and ``send`` returns
once it has). Faults come from ``network.faults`` (:mod:`.mock_faults`) or ``kill``/``stall``/``resume``.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import math
import os
from typing import Any, ClassVar

from ..errors import ConnectionClosedError, FrameTooLargeError, PeerDeadError, ProtocolError
from ..memory import as_byte_view
from .base import Connection, ConnectionStatistics, Frame, Listener, PayloadSink, Transport, TransportCapabilities
from .mock_faults import FaultAction, FaultInjector, FaultRule

__all__ = ["FaultAction", "FaultRule", "MockConnection", "MockListener", "MockNetwork", "MockTransport"]

_OPEN, _CLOSED, _DEAD = "open", "closed", "dead"


class _Frame:
    __slots__ = ("done", "header", "nbytes", "payload", "ready_at")

    def __init__(self, header: bytes, payload: Any, nbytes: int, ready_at: float) -> None:
        self.header = header
        self.payload = payload
        self.nbytes = nbytes
        self.ready_at = ready_at
        self.done: asyncio.Future[None] | None = None


class _Pipe:
    """One direction of a connection."""

    __slots__ = ("busy_until", "frames", "readable", "reason", "stalled_until", "state")

    def __init__(self) -> None:
        self.frames: collections.deque[_Frame] = collections.deque()
        self.readable = asyncio.Event()
        self.state = _OPEN
        self.reason = ""
        self.stalled_until = 0.0
        self.busy_until = 0.0

    def fail_pending(self, exc: BaseException) -> None:
        for frame in self.frames:
            if frame.done is not None and not frame.done.done():
                frame.done.set_exception(exc)
                frame.done.exception()  # mark retrieved: the sender may already be gone
        self.readable.set()


class MockNetwork:
    """The shared in-memory fabric: listeners by address, the link model and the fault rules."""

    def __init__(
        self,
        *,
        latency_s: float = 0.0,
        bandwidth_Bps: float | None = None,
        ingress_Bps: float | None = None,
        eager_threshold: int = 8192,
        max_message_size: int = 1 << 31,
        seed: int = 0,
    ) -> None:
        if latency_s < 0 or (bandwidth_Bps is not None and bandwidth_Bps <= 0) or (ingress_Bps is not None and ingress_Bps <= 0):
            raise ValueError(
                f"latency_s={latency_s!r}, bandwidth_Bps={bandwidth_Bps!r} and ingress_Bps={ingress_Bps!r} must be positive"
            )
        self.latency_s = latency_s
        self.bandwidth_Bps = bandwidth_Bps
        #: each endpoint's incoming link, shared by every connection to it (a receiver fed by several senders):
        #: a frame waits for its turn on it, in the order frames were sent
        self.ingress_Bps = ingress_Bps
        self.ingress_busy_until: dict[str, float] = {}
        self.eager_threshold = eager_threshold
        self.max_message_size = max_message_size
        self.faults = FaultInjector(seed)
        self._listeners: dict[str, MockListener] = {}
        self._connections: set[MockConnection] = set()
        self._names = itertools.count(1)

    def new_address(self, stem: str = "ep") -> str:
        return f"mock://{stem}-{next(self._names)}"

    def connections(self, address: str | None = None) -> list[MockConnection]:
        """Open connections, all or those of one endpoint."""
        return [c for c in self._connections if address is None or address in (c.local_address, c.peer_address)]

    def kill(self, address: str, reason: str = "killed") -> int:
        """The endpoint at ``address`` dies: its listeners close and every connection of it breaks.
        Returns the number of connections broken."""
        listener = self._listeners.pop(address, None)
        if listener is not None:
            listener._shut()
        victims = [c for c in self._connections if c.local_address == address]
        for conn in victims:
            conn._break(f"{address} {reason}")
        return len(victims)

    def stall(self, address: str, seconds: float | None = None) -> None:
        """Freeze every link of ``address`` both ways for ``seconds`` (``None``: until :meth:`resume`)."""
        loop = asyncio.get_running_loop()
        until = math.inf if seconds is None else loop.time() + seconds
        for conn in self.connections(address):
            conn._tx.stalled_until = conn._rx.stalled_until = until

    def resume(self, address: str) -> None:
        for conn in self.connections(address):
            for pipe in (conn._tx, conn._rx):
                pipe.stalled_until = 0.0
                pipe.readable.set()


class MockConnection(Connection):
    """One end of an in-memory connection."""

    def __init__(self, network: MockNetwork, local: str, peer: str, tx: _Pipe, rx: _Pipe) -> None:
        self.network = network
        self.local_address = local
        self.peer_address = peer
        self._tx, self._rx = tx, rx
        self._closed = False
        self._counts = [0, 0, 0, 0]  # frames sent, frames received, bytes sent, bytes received

    def __repr__(self) -> str:
        return f"<MockConnection {self.local_address} -> {self.peer_address}>"

    def _check_sendable(self) -> None:
        if self._closed:
            raise ConnectionClosedError(f"connection {self.local_address} -> {self.peer_address} is closed")
        if self._tx.state == _DEAD:
            raise PeerDeadError(f"peer {self.peer_address} is dead: {self._tx.reason}")
        if self._rx.state == _CLOSED:
            raise ConnectionClosedError(f"peer {self.peer_address} closed the connection")

    async def send(self, header: bytes, payload: Any = None) -> None:
        self._check_sendable()
        view = None if payload is None else as_byte_view(payload)
        nbytes = 0 if view is None else view.nbytes
        if nbytes > self.network.max_message_size:
            raise FrameTooLargeError(f"payload of {nbytes} bytes exceeds max_message_size={self.network.max_message_size}")
        net, tx = self.network, self._tx
        loop = asyncio.get_running_loop()
        now = loop.time()
        if net.bandwidth_Bps is not None:
            tx.busy_until = max(now, tx.busy_until) + (len(header) + nbytes) / net.bandwidth_Bps
            await asyncio.sleep(tx.busy_until - now)
            self._check_sendable()
        if net.ingress_Bps is not None:  # the receiver's link: shared with its other senders
            start = max(loop.time(), net.ingress_busy_until.get(self.peer_address, 0.0))
            net.ingress_busy_until[self.peer_address] = start + (len(header) + nbytes) / net.ingress_Bps
            await asyncio.sleep(net.ingress_busy_until[self.peer_address] - loop.time())
            self._check_sendable()
            now = loop.time()
        frame = _Frame(header, view, nbytes, max(now, tx.busy_until) + net.latency_s)
        duplicate = False
        for rule in (
            net.faults.decide(self.local_address, self.peer_address, header, view is not None) if net.faults.rules else ()
        ):
            action = rule.action
            if action is FaultAction.DROP:
                self._count_sent(nbytes)
                return
            if action is FaultAction.KILL:
                net.kill(self.local_address, "killed by fault rule")
                raise PeerDeadError(f"{self.local_address} died sending to {self.peer_address} (fault rule)")
            if action is FaultAction.DELAY:
                frame.ready_at += rule.delay_s
            elif action is FaultAction.STALL:
                tx.stalled_until = math.inf if rule.delay_s == 0 else now + rule.delay_s
            elif action is FaultAction.DUPLICATE:
                duplicate = True
            elif action is FaultAction.CORRUPT and nbytes:
                corrupted = bytearray(view)  # type: ignore[arg-type]
                corrupted[net.faults.randint(nbytes)] ^= 0xFF
                frame.payload = corrupted
        if duplicate:
            tx.frames.append(_Frame(header, None if view is None else bytes(frame.payload), nbytes, frame.ready_at))
        self._count_sent(nbytes)
        if view is None or nbytes <= net.eager_threshold or frame.payload is not view:
            if frame.payload is view and view is not None:
                frame.payload = bytes(view)
            tx.frames.append(frame)
            tx.readable.set()
            return
        frame.done = loop.create_future()
        tx.frames.append(frame)
        tx.readable.set()
        try:
            await frame.done
        except asyncio.CancelledError:
            if frame in tx.frames:
                tx.frames.remove(frame)  # never taken: nothing of it is left behind
            raise

    def _count_sent(self, nbytes: int) -> None:
        self._counts[0] += 1
        self._counts[2] += nbytes

    async def recv(self, sink: PayloadSink | None = None) -> Frame:
        rx = self._rx
        loop = asyncio.get_running_loop()
        while True:
            if self._closed:
                raise ConnectionClosedError(f"connection {self.local_address} -> {self.peer_address} is closed")
            if rx.state == _DEAD:
                raise PeerDeadError(f"peer {self.peer_address} is dead: {rx.reason}")
            now = loop.time()
            if rx.stalled_until > now:
                if rx.stalled_until == math.inf:
                    rx.readable.clear()
                    await rx.readable.wait()
                else:
                    await asyncio.sleep(rx.stalled_until - now)
                continue
            if rx.frames:
                frame = rx.frames[0]
                if frame.ready_at > now:
                    await asyncio.sleep(frame.ready_at - now)
                    continue
                rx.frames.popleft()
                return self._deliver(frame, sink)
            if rx.state == _CLOSED:
                raise ConnectionClosedError(f"peer {self.peer_address} closed the connection")
            rx.readable.clear()
            await rx.readable.wait()

    def _deliver(self, frame: _Frame, sink: PayloadSink | None) -> Frame:
        error = self._frame_error(len(frame.header), frame.nbytes if frame.payload is not None else 0)
        if error:  # as on a real transport: the connection ends, nothing is allocated for the frame
            if frame.done is not None and not frame.done.done():
                frame.done.set_result(None)
            self._break(f"protocol error: {error}")
            raise FrameTooLargeError(error)
        self._counts[1] += 1
        self._counts[3] += frame.nbytes
        try:
            if frame.payload is None:
                return Frame(frame.header, None)
            target = sink(frame.header, frame.nbytes) if sink is not None else None
            if target is None:
                target = bytearray(frame.nbytes)
            view = as_byte_view(target, writable=True)
            if view.nbytes != frame.nbytes:
                raise ProtocolError(f"sink gave {view.nbytes} bytes for a {frame.nbytes}-byte payload")
            view[:] = frame.payload
            return Frame(frame.header, view)
        finally:
            if frame.done is not None and not frame.done.done():
                frame.done.set_result(None)

    def statistics(self) -> ConnectionStatistics:
        return ConnectionStatistics(*self._counts)

    def peer_credentials(self) -> tuple[int, int, int] | None:
        """The peer is this very process (the fabric lives in its memory)."""
        return os.getpid(), os.getuid(), os.getgid()

    def _break(self, reason: str) -> None:
        for pipe in (self._tx, self._rx):
            pipe.state, pipe.reason = _DEAD, reason
            pipe.fail_pending(PeerDeadError(f"connection {self.local_address} <-> {self.peer_address} broke: {reason}"))
            pipe.frames.clear()
        self.network._connections.discard(self)
        for other in self.network._connections:
            if other._tx is self._rx:
                self.network._connections.discard(other)
                break

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._tx.state == _OPEN:
            self._tx.state = _CLOSED
        self._tx.readable.set()
        if self._rx.state == _OPEN:
            self._rx.state = _CLOSED
        self._rx.fail_pending(ConnectionClosedError(f"peer {self.local_address} closed the connection"))
        self._rx.frames.clear()
        self.network._connections.discard(self)


class MockListener(Listener):
    def __init__(self, transport: MockTransport, address: str) -> None:
        self.transport = transport
        self.address = address
        self._queue: asyncio.Queue[MockConnection | None] = asyncio.Queue()
        self._closed = False

    async def accept(self) -> Connection:
        if self._closed:
            raise ConnectionClosedError(f"listener {self.address} is closed")
        conn = await self._queue.get()
        if conn is None:
            self._queue.put_nowait(None)
            raise ConnectionClosedError(f"listener {self.address} is closed")
        return conn

    def _shut(self) -> None:
        self._closed = True
        self._queue.put_nowait(None)

    async def aclose(self) -> None:
        if self.transport.network._listeners.get(self.address) is self:
            del self.transport.network._listeners[self.address]
        self._shut()


class MockTransport(Transport):
    """In-memory transport on a :class:`MockNetwork` (a private one unless ``network`` is given)."""

    name: ClassVar[str] = "mock"
    capabilities: TransportCapabilities = TransportCapabilities(
        memory_kinds=frozenset({"cpu"}), ordered=True, max_message_size=1 << 31, zero_copy=True
    )

    def __init__(self, network: MockNetwork | None = None, *, name: str | None = None) -> None:
        self.network = network if network is not None else MockNetwork()
        self.address = f"mock://{name}" if name else self.network.new_address()

    async def connect(self, address: str) -> Connection:
        listener = self.network._listeners.get(address)
        if listener is None:
            raise PeerDeadError(f"nothing listens at {address}")
        forward, backward = _Pipe(), _Pipe()
        client = MockConnection(self.network, self.address, listener.address, forward, backward)
        server = MockConnection(self.network, listener.address, self.address, backward, forward)
        self.network._connections.update((client, server))
        listener._queue.put_nowait(server)
        return client

    async def listen(self, address: str | None = None) -> Listener:
        address = address or self.address
        if address in self.network._listeners:
            raise ConnectionClosedError(f"address {address} is already in use")
        listener = MockListener(self, address)
        self.network._listeners[address] = listener
        return listener
