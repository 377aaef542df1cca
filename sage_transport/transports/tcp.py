"""A TCP transport of our own on asyncio, for links where UCX's TCP from Python is slow (~1.2 GB/s here).

The receive side is a :class:`asyncio.BufferedProtocol`: headers land in a reused buffer, and a payload's
bytes land straight in the sink's buffer (the kernel copies into the KV cache; no staging, no Python
copy), or in the list of buffers the sink gives (a chunk's scattered pages: ``recvmsg_into`` over them). The
send side sends from the caller's buffer (or list of buffers, with ``sendmsg``) on a duplicate of the socket
(no event-loop write buffer, so no copy): a frame goes at once when the socket takes it, else behind a FIFO lock, shielded so
that a cancelled caller never leaves half a frame; ``send`` returns once the payload is in the kernel.
Run the loop on uvloop for full speed (``sage-transport`` does). Peer death is end-of-stream without the
goodbye frame or a reset; TCP keepalive and ``TCP_USER_TIMEOUT``, both from ``peer_timeout_s``, cover a silent host
and a partition (unacknowledged bytes).

Frame on the stream: ``<IQ`` (header length, payload length + 1, 0 for none, 2**64-1 for goodbye), the
header, the payload.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import socket
import struct
from typing import Any, ClassVar

from ..config import KVTransportConfig, is_loopback
from ..errors import ConnectionClosedError, FrameTooLargeError, PeerDeadError, ProtocolError
from ..memory import as_byte_view
from .base import DISCARD_LIMIT, Connection, ConnectionStatistics, Frame, Listener, PayloadSink, Transport, TransportCapabilities
from .link import parse_host_port
from .listeners import ServerListener

__all__ = ["TcpConnection", "TcpTransport"]

_PREFIX = struct.Struct("<IQ")
_GOODBYE = (1 << 64) - 1
_BUFFER = 256 << 10  # receive buffer once authenticated
_HANDSHAKE_BUFFER = 16 << 10  # before: what a handshake message needs (an idle stranger costs little)
_MAX_PAYLOAD = 1 << 40
_INLINE = 64 << 10  # payloads up to this size are copied behind the header (one send call)
_EARLY_LIMIT = 64 << 20
_EARLY_AFTER_S = 0.002
_RECV_SPINS = 64  # payload bytes received ahead of the receiver's sink before reading pauses
_IOV_MAX = 1024  # buffers one sendmsg takes (Linux's UIO_MAXIOV)


class _Early:
    """A payload that arrived before ``recv`` offered a sink (copied into the sink when it does)."""

    __slots__ = ("header", "payload")

    def __init__(self, header: bytes, payload: memoryview) -> None:
        self.header, self.payload = header, payload


def _tune(sock: socket.socket | None, peer_timeout_s: float) -> None:
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        idle = max(1, int(peer_timeout_s / 2))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, idle // 3))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
        # bytes unacknowledged this long (a partition while sending: keepalive is silent then, and the kernel
        # would retransmit for ~15 minutes) or unanswered keepalives end the connection with ETIMEDOUT
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, max(1, int(peer_timeout_s * 1000)))


class TcpConnection(asyncio.BufferedProtocol, Connection):
    """Both the protocol (receive state machine) and the :class:`Connection`. ``send`` also takes a payload as a
    list of views (a chunk's pages), sent with ``sendmsg`` from where they lie (no gather copy)."""

    gathers = True

    def __init__(self, peer_timeout_s: float = 10.0, on_made: Any = None) -> None:
        self.local_address = self.peer_address = "?"
        self.same_host = False
        self._peer_timeout_s = peer_timeout_s
        self._on_made = on_made
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray(_HANDSHAKE_BUFFER)
        self._view = memoryview(self._buf)
        self._start = self._end = 0
        # the frame whose payload is being received
        self._header = b""
        self._target: memoryview | None = None  # where the payload's next bytes go (the current piece when scattered)
        self._pieces: list[memoryview] | None = None  # a scattered payload's pieces (the sink gave a list)
        self._piece = 0
        self._target_pos = 0
        self._target_error: BaseException | None = None
        self._awaiting_sink = False  # a payload header was parsed and no receiver has offered a sink yet
        self._pending_plen = 0
        self._frames: collections.deque[Frame | _Early | BaseException] = collections.deque()
        self._early_bytes = 0
        self._spinning = False
        self._early_timer: asyncio.TimerHandle | None = None
        self._target_early = False
        self._sink: PayloadSink | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._sock: socket.socket | None = None  # a dup of the connection's socket: sends go straight from the payload
        self._writing = 0  # frames queued behind the send lock
        self._send_lock = asyncio.Lock()
        self._scratch = bytearray(0)  # where refused payloads are consumed (up to DISCARD_LIMIT)
        self._state = ""  # "", "closed", "peer-closed", "dead: reason"
        self._counts = [0, 0, 0, 0]

    def __repr__(self) -> str:
        return f"<TcpConnection {self.local_address} -> {self.peer_address}>"

    # ---- protocol callbacks -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport subclasses
        sock = transport.get_extra_info("socket")
        _tune(sock, self._peer_timeout_s)
        self._sock = socket.socket(fileno=os.dup(sock.fileno()))
        self._sock.setblocking(False)
        local, peer = transport.get_extra_info("sockname"), transport.get_extra_info("peername")
        self.local_address = f"{local[0]}:{local[1]}" if local else "?"
        self.peer_address = f"{peer[0]}:{peer[1]}" if peer else "?"
        # a peer reached at one of our own addresses runs on this host (and in this network namespace); the
        # channel may then offer it direct placement, which still checks the boot id and process access
        self.same_host = bool(local and peer) and (local[0] == peer[0] or is_loopback(peer[0]))
        if self._on_made is not None:
            self._on_made(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._state:
            self._state = f"dead: {exc or 'the connection ended without a goodbye'}"
        if self._target is not None:  # a payload cut short: it never completes
            self._target, self._pieces, self._awaiting_sink = None, None, False
        self._wake()

    def eof_received(self) -> bool:
        if not self._state:
            self._state = "dead: the peer went away without a goodbye"
        self._wake()
        return False

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._target is not None:
            return self._target[self._target_pos :]
        if self._end == len(self._buf):
            self._compact()
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._target is not None:
            self._target_pos += nbytes
            if self._target_pos < self._target.nbytes:
                return
            if self._pieces is not None and not self._next_piece():
                return
            self._finish_payload()
        else:
            self._end += nbytes
        self._parse()

    # ---- receive state machine ----------------------------------------------------------------------

    def _compact(self) -> None:
        pending = self._end - self._start
        if self._start:
            self._buf[:pending] = self._buf[self._start : self._end]
        self._start, self._end = 0, pending
        if pending == len(self._buf):  # one header larger than the buffer: grow (bounded by max_header)
            self._grow(2 * len(self._buf))

    def _grow(self, size: int) -> None:
        """A larger receive buffer holding the unparsed bytes (a new one: the old one's view is exported)."""
        pending = self._end - self._start
        buf = bytearray(size)
        buf[:pending] = self._view[self._start : self._end]
        self._buf, self._view = buf, memoryview(buf)
        self._start, self._end = 0, pending

    async def authenticated(self, max_header: int, max_payload: int) -> None:
        await super().authenticated(max_header, max_payload)
        if len(self._buf) < _BUFFER and self._target is None:
            self._grow(_BUFFER)

    def _parse(self) -> None:
        while not self._awaiting_sink and self._target is None:
            available = self._end - self._start
            if available < _PREFIX.size:
                break
            hlen, plen = _PREFIX.unpack_from(self._buf, self._start)
            if plen == _GOODBYE:
                self._start += _PREFIX.size
                self._state = self._state or "peer-closed"
                self._wake()
                break
            error = self._frame_error(hlen, plen - 1 if plen else 0)
            if error:  # refused before anything is allocated for it; the connection ends
                self._state = f"dead: protocol error: {error}"
                self._frames.append(FrameTooLargeError(error))
                if self._transport is not None:
                    self._transport.abort()
                self._wake()
                break
            if available < _PREFIX.size + hlen:
                if self._start + _PREFIX.size + hlen > len(self._buf):
                    self._compact()
                break
            begin = self._start + _PREFIX.size
            header = bytes(self._buf[begin : begin + hlen])
            self._start = begin + hlen
            if plen == 0:
                self._frames.append(Frame(header, None))
                self._counts[1] += 1
                self._wake()
                continue
            self._header, self._pending_plen = header, plen - 1
            if (self._waiter is not None or self._spinning) and not self._frames:
                self._attach_sink()
            else:  # wait a moment for the receiver's sink (zero-copy); then buffer early so senders never stall
                self._awaiting_sink = True
                if self._transport is not None:
                    self._transport.pause_reading()
                self._early_timer = asyncio.get_running_loop().call_later(_EARLY_AFTER_S, self._go_early)
        if self._start == self._end:
            self._start = self._end = 0

    def _go_early(self) -> None:
        self._early_timer = None
        if not self._awaiting_sink or self._early_bytes + self._pending_plen > _EARLY_LIMIT or self._state:
            return
        self._awaiting_sink = False
        self._early_bytes += self._pending_plen
        self._attach_sink(early=True)
        if self._transport is not None:
            self._transport.resume_reading()
        self._parse()

    def _attach_sink(self, early: bool = False) -> None:
        """Ask the waiting receiver's sink for the payload's buffer (``early``: no receiver yet, use a
        temporary one) and move already-buffered bytes into it."""
        nbytes, header, sink = self._pending_plen, self._header, None if early else self._sink
        if not early:
            self._sink = None
        self._target_early = early
        self._target_error = None
        target: Any = None
        pieces: list[memoryview] | None = None
        try:
            if sink is not None:
                target = sink(header, nbytes)
            if type(target) is list:  # the payload's pieces, back to back (a chunk's scattered pages)
                pieces = [as_byte_view(piece, writable=True) for piece in target]
                total = sum(piece.nbytes for piece in pieces)
                if total != nbytes or not pieces or not all(piece.nbytes for piece in pieces):
                    raise ProtocolError(f"sink gave {len(pieces)} pieces of {total} bytes for a {nbytes}-byte payload")
                view = pieces[0]
            else:
                view = as_byte_view(bytearray(nbytes) if target is None else target, writable=True)
                if view.nbytes != nbytes:
                    raise ProtocolError(f"sink gave {view.nbytes} bytes for a {nbytes}-byte payload")
        except BaseException as exc:  # the frame is consumed into scratch; the receiver gets the error
            self._target_error = exc
            if nbytes > DISCARD_LIMIT:  # consuming it would allocate what the peer names: end the connection
                self._target_error = None
                self._state = f"dead: a refused {nbytes}-byte payload ({exc})"
                self._frames.append(exc)
                if self._transport is not None:
                    self._transport.abort()
                self._wake()
                return
            if len(self._scratch) < nbytes:
                self._scratch = bytearray(nbytes)
            view, pieces = memoryview(self._scratch)[:nbytes], None
        self._target, self._target_pos, self._pieces, self._piece = view, 0, pieces, 0
        buffered = self._end - self._start
        if pieces is None:
            buffered = min(buffered, nbytes)
            if buffered:
                view[:buffered] = self._view[self._start : self._start + buffered]
                self._start += buffered
                self._target_pos = buffered
            if self._target_pos == nbytes:
                self._finish_payload()
            return
        index = 0  # bytes already read go into the pieces first
        while buffered and index < len(pieces):
            take = min(buffered, pieces[index].nbytes)
            pieces[index][:take] = self._view[self._start : self._start + take]
            self._start += take
            buffered -= take
            if take < pieces[index].nbytes:
                self._piece, self._target, self._target_pos = index, pieces[index], take
                return
            index += 1
        if index == len(pieces):
            self._finish_payload()
            return
        self._piece, self._target, self._target_pos = index, pieces[index], 0

    def _next_piece(self) -> bool:
        """The current piece of a scattered payload is full: read on into the next ones straight from the socket
        (``recvmsg_into`` over up to ``_IOV_MAX`` pieces a call, without waiting for the loop: a page is a few KiB
        and one read each would cost more than the copy it saves). True once every piece is full."""
        pieces = self._pieces
        assert pieces is not None
        index = self._piece + 1
        sock = self._sock
        while index < len(pieces):
            if sock is None:
                break
            try:
                got = sock.recvmsg_into(pieces[index : index + _IOV_MAX])[0]
            except (BlockingIOError, InterruptedError, OSError):
                break  # nothing more now (or an error the transport reports): the loop reads on into this piece
            if not got:
                break  # end of stream: the transport's own read reports it
            while index < len(pieces) and got >= pieces[index].nbytes:
                got -= pieces[index].nbytes
                index += 1
            if got:  # into the middle of one: the loop (or the next call) goes on from there
                self._piece, self._target, self._target_pos = index, pieces[index], got
                return False
        if index == len(pieces):
            return True
        self._piece, self._target, self._target_pos = index, pieces[index], 0
        return False

    def _finish_payload(self) -> None:
        assert self._target is not None
        frame: Frame | _Early | BaseException
        payload: Any = self._target if self._pieces is None else self._pieces
        if self._target_early:
            frame = _Early(self._header, self._target)
        else:
            frame = Frame(self._header, payload) if self._target_error is None else self._target_error
        self._counts[1] += 1
        self._counts[3] += self._pending_plen
        self._target, self._target_error, self._pieces = None, None, None
        self._frames.append(frame)
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ---- Connection ---------------------------------------------------------------------------------

    async def recv(self, sink: PayloadSink | None = None) -> Frame:
        while True:
            if self._frames:
                item = self._frames.popleft()
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, _Early):
                    return self._deliver_early(item, sink)
                return item
            if self._awaiting_sink:
                self._awaiting_sink = False
                if self._early_timer is not None:
                    self._early_timer.cancel()
                    self._early_timer = None
                self._sink = sink
                self._attach_sink()
                if self._transport is not None and not self._state:
                    self._transport.resume_reading()
                self._parse()
                continue
            if self._state == "closed":
                raise ConnectionClosedError(f"connection {self.local_address} -> {self.peer_address} is closed")
            if self._target is None and self._state == "peer-closed":
                raise ConnectionClosedError(f"peer {self.peer_address} closed the connection")
            if self._target is None and self._state.startswith("dead"):
                raise PeerDeadError(f"peer {self.peer_address} is {self._state}")
            self._sink = sink
            if await self._spin_read():
                continue
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
                self._sink = None

    async def _spin_read(self) -> bool:
        """Before parking, poll the socket directly for a short while (non-blocking reads fed to the protocol,
        as the loop would, yielding between tries); True when bytes came. Saves the epoll wake-up, which is
        most of a small message's latency here."""
        for _ in range(_RECV_SPINS):
            if self._frames or self._awaiting_sink or self._state:
                return True  # the loop read something while we yielded: let recv look again
            sock = self._sock
            if sock is None or self._target is not None:
                return False  # a payload is being received: park, its completion wakes us
            try:
                nbytes = sock.recv_into(self.get_buffer(-1))
            except (BlockingIOError, InterruptedError):
                await asyncio.sleep(0)
                continue
            except OSError:
                return False  # the transport sees the error too and reports it
            if nbytes == 0:
                return False  # end of stream: the transport's own read reports it
            self._spinning = True
            try:
                self.buffer_updated(nbytes)
            finally:
                self._spinning = False
            return True
        return False

    def _deliver_early(self, item: _Early, sink: PayloadSink | None) -> Frame:
        nbytes = item.payload.nbytes
        self._early_bytes -= nbytes
        target = sink(item.header, nbytes) if sink is not None else None
        if target is None:
            return Frame(item.header, item.payload)
        if type(target) is list:
            pieces = [as_byte_view(piece, writable=True) for piece in target]
            if sum(piece.nbytes for piece in pieces) != nbytes:
                raise ProtocolError(f"sink gave {len(pieces)} pieces that do not hold a {nbytes}-byte payload")
            pos = 0
            for piece in pieces:
                piece[:] = item.payload[pos : pos + piece.nbytes]
                pos += piece.nbytes
            return Frame(item.header, pieces)
        view = as_byte_view(target, writable=True)
        if view.nbytes != nbytes:
            raise ProtocolError(f"sink gave {view.nbytes} bytes for a {nbytes}-byte payload")
        view[:] = item.payload
        return Frame(item.header, view)

    async def send(self, header: bytes, payload: Any = None) -> None:
        if type(payload) is list:
            await self._send_gathered(header, payload)
            return
        self._check_sendable()
        view = None if payload is None else as_byte_view(payload)
        nbytes = 0 if view is None else view.nbytes
        if nbytes > _MAX_PAYLOAD:
            raise FrameTooLargeError(f"payload of {nbytes} bytes exceeds {_MAX_PAYLOAD}")
        head = _PREFIX.pack(len(header), 0 if view is None else nbytes + 1) + header
        if view is not None and nbytes <= _INLINE:
            head, view = head + view, None  # small payloads: one buffer, one system call
        self._counts[0] += 1
        self._counts[2] += nbytes
        sock = self._sock
        assert sock is not None
        sent = 0
        if not self._writing:  # nothing queued before us: try to send at once
            try:
                sent = sock.send(head)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self._lost(exc)
                raise PeerDeadError(f"peer {self.peer_address} is gone: {exc}") from exc
            if sent == len(head) and view is None:
                return
        self._writing += 1
        # shielded: a cancelled caller leaves the frame to finish whole, never half-written
        await asyncio.shield(asyncio.ensure_future(self._send_rest(memoryview(head)[sent:], view)))

    async def _send_rest(self, head: memoryview, view: memoryview | None) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with self._send_lock:
                for part in (head, view):
                    if part is not None and part.nbytes:
                        await loop.sock_sendall(self._sock, part)  # type: ignore[arg-type]
        except OSError as exc:
            self._lost(exc)
            raise PeerDeadError(f"peer {self.peer_address} is gone: {exc}") from exc
        finally:
            self._writing -= 1

    async def _send_gathered(self, header: bytes, pieces: list[memoryview]) -> None:
        """One frame whose payload is ``pieces`` back to back, sent by ``sendmsg`` (at most ``_IOV_MAX`` buffers a
        call) straight from them."""
        self._check_sendable()
        nbytes = sum(piece.nbytes for piece in pieces)
        if nbytes > _MAX_PAYLOAD:
            raise FrameTooLargeError(f"payload of {nbytes} bytes exceeds {_MAX_PAYLOAD}")
        parts = [memoryview(_PREFIX.pack(len(header), nbytes + 1) + header), *pieces]
        self._counts[0] += 1
        self._counts[2] += nbytes
        self._writing += 1
        await asyncio.shield(asyncio.ensure_future(self._sendmsg_all(parts)))

    async def _sendmsg_all(self, parts: list[memoryview]) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with self._send_lock:
                sock = self._sock
                assert sock is not None
                first = 0
                while first < len(parts):
                    try:
                        sent = sock.sendmsg(parts[first : first + _IOV_MAX])
                    except (BlockingIOError, InterruptedError):
                        writable = loop.create_future()
                        loop.add_writer(sock.fileno(), writable.set_result, None)
                        try:
                            await writable
                        finally:
                            loop.remove_writer(sock.fileno())
                        continue
                    while sent and sent >= parts[first].nbytes:  # whole parts gone
                        sent -= parts[first].nbytes
                        first += 1
                    if sent:  # part of one: the rest of it goes next
                        parts[first] = parts[first][sent:]
        except OSError as exc:
            self._lost(exc)
            raise PeerDeadError(f"peer {self.peer_address} is gone: {exc}") from exc
        finally:
            self._writing -= 1

    def _lost(self, exc: BaseException) -> None:
        if not self._state:
            self._state = f"dead: {exc}"
        self._wake()

    def _check_sendable(self) -> None:
        if self._state == "closed":
            raise ConnectionClosedError(f"connection {self.local_address} -> {self.peer_address} is closed")
        if self._state == "peer-closed":
            raise ConnectionClosedError(f"peer {self.peer_address} closed the connection")
        if self._state.startswith("dead") or self._transport is None or self._transport.is_closing():
            raise PeerDeadError(f"peer {self.peer_address} is {self._state or 'gone'}")

    def statistics(self) -> ConnectionStatistics:
        return ConnectionStatistics(*self._counts)

    def link_info(self) -> dict[str, Any]:
        return {"same_host": self.same_host, "transport": "tcp", "peer": self.peer_address}

    async def aclose(self) -> None:
        if self._state == "closed":
            return
        if not self._state and self._sock is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    self._writing += 1
                    await self._send_rest(memoryview(_PREFIX.pack(0, _GOODBYE)), None)
        self._state = "closed"
        self._close_socket()
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()
        self._wake()

    def _close_socket(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def abort(self) -> None:
        """Die abruptly: reset the connection, no goodbye."""
        if self._transport is not None:
            sock = self._transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self._transport.abort()
        self._close_socket()
        self._state = "closed"
        self._wake()


class TcpTransport(Transport):
    """Framed TCP on asyncio (uvloop when the loop is uvloop's)."""

    name: ClassVar[str] = "tcp"
    capabilities: TransportCapabilities = TransportCapabilities(
        memory_kinds=frozenset({"cpu"}), ordered=True, max_message_size=_MAX_PAYLOAD, zero_copy=True
    )

    def __init__(
        self, *, host: str = "127.0.0.1", port: int = 0, peer_timeout_s: float = 10.0, connect_timeout_s: float = 10.0
    ) -> None:
        self.host, self.port = host, port
        self.peer_timeout_s = peer_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._listeners: list[ServerListener] = []
        self._connections: set[TcpConnection] = set()

    @classmethod
    def from_config(cls, config: KVTransportConfig) -> TcpTransport:
        return cls(
            host=config.listen_host,
            port=config.listen_port,
            peer_timeout_s=config.peer_timeout_s,
            connect_timeout_s=config.connect_timeout_s,
        )

    async def connect(self, address: str) -> Connection:
        host, port = parse_host_port(address)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await loop.create_connection(lambda: TcpConnection(self.peer_timeout_s), host, port)
        except (OSError, TimeoutError) as exc:
            raise PeerDeadError(f"nothing answers at {host}:{port}: {exc or 'timed out'}") from exc
        self._connections.add(conn)
        return conn

    async def listen(self, address: str | None = None) -> Listener:
        host, port = parse_host_port(address, "listen address") if address else (self.host, self.port)
        loop = asyncio.get_running_loop()

        def start(offer: Any) -> Any:
            def made(conn: TcpConnection) -> None:
                self._connections.add(conn)
                offer(conn)

            return loop.create_server(lambda: TcpConnection(self.peer_timeout_s, made), host, port)

        listener = await ServerListener.open(start, host, port)
        self._listeners.append(listener)
        return listener

    async def aclose(self) -> None:
        for listener in self._listeners:
            await listener.aclose()
        for conn in list(self._connections):
            await conn.aclose()
        self._connections.clear()
