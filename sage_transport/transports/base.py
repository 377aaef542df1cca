"""The transport seam: the only thing the async core knows about moving bytes.

A :class:`Transport` opens :class:`Connection` objects (``connect``) and accepts them (``listen``). A
connection moves *frames*: a small header (bytes) plus an optional payload buffer, in order, whole or
not at all. On receive, the caller may pass a *sink*: given the header and the payload size, it returns
the buffer the payload should land in (for zero-copy placement into registered memory). Everything is
an async context manager; capabilities are data on the class.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from types import TracebackType
from typing import Any, ClassVar, NamedTuple

import msgspec

__all__ = [
    "DISCARD_LIMIT",
    "HANDSHAKE_FRAME_LIMIT",
    "Connection",
    "ConnectionStatistics",
    "Frame",
    "Listener",
    "PayloadSink",
    "Transport",
    "TransportCapabilities",
]

#: Largest header a connection takes before :meth:`Connection.authenticated`: a handshake message. Until then
#: no frame may carry a payload; a larger or payload-carrying frame ends the connection before anything is
#: allocated for it.
HANDSHAKE_FRAME_LIMIT = 8 << 10

#: Largest payload a connection consumes after its sink refused it (into reused scratch); a larger refused
#: payload ends the connection instead of allocating what the peer names.
DISCARD_LIMIT = 4 << 20

#: ``sink(header, nbytes)`` returns a writable buffer of exactly ``nbytes`` bytes, or ``None`` to let the
#: connection allocate one; to a connection that ``gathers``, also a list of writable buffers of ``nbytes`` in all,
#: which the payload fills one after the other (received straight into scattered pages).
PayloadSink = Callable[[bytes, int], Any]


class TransportCapabilities(msgspec.Struct, frozen=True):
    """What a transport can do. ``memory_kinds``: buffers it moves (``cpu``, ``cuda``); ``ordered``: frames
    arrive in send order; ``zero_copy``: payloads land in the sink's buffer without a staging copy."""

    memory_kinds: frozenset[str]
    ordered: bool
    max_message_size: int
    zero_copy: bool


class Frame(NamedTuple):
    """A received frame. ``payload`` is the sink's buffer (or a fresh one), ``None`` if none was sent; where the
    sink gave a list of buffers (pieces, filled back to back: a transport that ``gathers`` takes one), that list."""

    header: bytes
    payload: Any


class ConnectionStatistics(msgspec.Struct, frozen=True):
    frames_sent: int
    frames_received: int
    bytes_sent: int
    bytes_received: int


class _AsyncResource(abc.ABC):
    async def __aenter__(self) -> Any:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release the resource; idempotent."""


class Connection(_AsyncResource):
    """One ordered, reliable, bidirectional frame stream to a peer.

    A new connection is *unauthenticated*: it accepts only frames with a header of at most
    :data:`HANDSHAKE_FRAME_LIMIT` bytes and no payload (``max_header``, ``max_payload``), and a transport that
    discloses anything of its own (UCX's worker address) waits until :meth:`authenticated`.
    """

    local_address: str
    peer_address: str
    #: ``send`` takes a payload given as a list of byte views, sent as one payload without a copy (gather), and
    #: ``recv``'s sink may return a list of buffers the payload fills one after the other (scatter)
    gathers: bool = False
    max_header: int = HANDSHAKE_FRAME_LIMIT
    max_payload: int = 0

    async def authenticated(self, max_header: int, max_payload: int) -> None:
        """The peer passed the handshake: accept headers up to ``max_header`` and payloads up to ``max_payload``
        bytes from now on (a transport may now finish its own set-up, e.g. UCX's endpoint). Raises
        ``PeerDeadError`` or ``ProtocolError`` when that set-up fails."""
        self.max_header, self.max_payload = max_header, max_payload

    def peer_credentials(self) -> tuple[int, int, int] | None:
        """``(pid, uid, gid)`` of the peer process when the transport itself can vouch for it (the in-memory
        transport: the peer is this process); ``None`` otherwise (the channel then asks the kernel)."""
        return None

    def _frame_error(self, hlen: int, nbytes: int) -> str:
        """Why a frame of ``hlen`` header and ``nbytes`` payload bytes breaks this connection's limits, or ``""``."""
        if hlen > self.max_header:
            return f"a {hlen}-byte header from {self.peer_address} exceeds the {self.max_header}-byte limit"
        if nbytes > self.max_payload:
            if not self.max_payload:
                return f"a {nbytes}-byte payload from {self.peer_address} before the handshake completed"
            return f"a {nbytes}-byte payload from {self.peer_address} exceeds the {self.max_payload}-byte limit"
        return ""

    @abc.abstractmethod
    async def send(self, header: bytes, payload: Any = None) -> None:
        """Send one frame. Returns once ``payload`` may be reused. Safe to call from several tasks: frames
        never interleave. A cancelled send either delivered the whole frame or nothing.

        Raises ``PeerDeadError`` (peer gone), ``ConnectionClosedError`` (closed), ``FrameTooLargeError``.
        """

    @abc.abstractmethod
    async def recv(self, sink: PayloadSink | None = None) -> Frame:
        """Receive the next frame, placing its payload in ``sink(header, nbytes)`` when given.

        Raises ``ConnectionClosedError`` at end of stream (peer closed cleanly, or we closed),
        ``PeerDeadError`` when the peer died, ``ProtocolError`` when the sink's buffer has the wrong size.
        Exceptions raised by the sink propagate; the frame is then consumed (a payload over
        :data:`DISCARD_LIMIT` ends the connection instead).
        """

    @abc.abstractmethod
    def statistics(self) -> ConnectionStatistics:
        """A snapshot of this connection's counters."""

    def link_info(self) -> dict[str, Any]:
        """What this connection really runs on (e.g. UCX transports in use); empty when nothing to say."""
        return {}


class Listener(_AsyncResource):
    """Accepts incoming connections on ``address``."""

    address: str

    @abc.abstractmethod
    async def accept(self) -> Connection:
        """Wait for the next incoming connection. Raises ``ConnectionClosedError`` once closed."""


class Transport(_AsyncResource):
    """A way to reach peers. Subclasses set ``name`` and ``capabilities``."""

    name: ClassVar[str]
    #: what the transport class can do; an instance may narrow or widen it for its own set-up (UCX declares
    #: ``cuda`` memory only where its CUDA transports are installed and allowed)
    capabilities: TransportCapabilities

    @classmethod
    def from_config(cls, config: Any) -> Transport:
        """Build from a :class:`~sage_transport.config.KVTransportConfig`; the default takes no settings."""
        return cls()

    @abc.abstractmethod
    async def connect(self, address: str) -> Connection:
        """Open a connection to ``address``. Raises ``PeerDeadError`` when nothing answers there."""

    @abc.abstractmethod
    async def listen(self, address: str | None = None) -> Listener:
        """Listen on ``address`` (``None``: any free address, reported by ``Listener.address``)."""

    async def aclose(self) -> None:
        """Release transport-wide resources (workers, contexts); the default holds none."""
