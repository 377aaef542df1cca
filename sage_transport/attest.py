"""Kernel-attested peers on one host: who a peer process is, and which memory it hands over.

Right after the handshake each side invites the other with an ``Attest``: the name of an abstract Unix socket of
this channel (one per channel, ``SOCK_SEQPACKET``) and a fresh nonce. A side that reaches the socket (same host
and network namespace) connects and sends a :class:`~sage_transport.wire.Presentation`: the nonce and, when it
lets this peer write its KV memory directly, a ``Window`` (buffer addresses and sizes) with its memfds passed as
``SCM_RIGHTS``. The kernel tells the inviter who connected (``SO_PEERCRED``: pid, uid and gid at connect time),
and the presenter who listens (the same, at listen time) before it hands anything over. Nothing in a message
names a process:

* CMA writes go only to the pid the kernel gave for the presenter, into addresses of its own process;
* shared-memory writes go only into memfds the presenter passed itself;
* without a token, a peer is trusted (pulls, pushes, windows) only when the kernel attests it as a process of
  this user on this host.

Residual risk: a pid the kernel attested may, in principle, be recycled if the presenter exits before the
writes start (the pid space would have to wrap in that time).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import re
import secrets
import socket
import struct
from collections.abc import Callable
from typing import NamedTuple

import msgspec
import structlog

from .errors import ProtocolError
from .handshake import expect
from .transports.base import Connection
from .wire import Attest, Attested, Presentation, Window, encode_message

__all__ = [
    "Attestation",
    "AttestationServer",
    "PeerIdentity",
    "Presented",
    "attest_peer",
    "close_fds",
    "listener_identity",
    "present",
    "present_to",
    "supported",
]

log = structlog.get_logger("sage_transport.attest")

_PREFIX = "sage-transport/"
_NAME = re.compile(r"sage-transport/[0-9a-f]{32}")
_FDS_PER_MESSAGE = 250  # the kernel passes at most 253 descriptors per message (SCM_MAX_FD)
_MAX_FDS = 4096
_MESSAGE_BYTES = 1 << 17  # a Window of 4096 buffers encodes in ~90 KiB
_PRESENT_TIMEOUT_S = 2.0
_CONCURRENT = 16  # presentations read at once; more connections are closed at once
_CRED = struct.Struct("3i")


class PeerIdentity(NamedTuple):
    """A peer process as the kernel attests it."""

    pid: int
    uid: int
    gid: int


class Presented(NamedTuple):
    """A presentation received on this side's socket: who sent it, its window, the memfds that came with it
    (the receiver owns and must close them)."""

    identity: PeerIdentity
    window: Window | None
    fds: list[int]


_decoder = msgspec.msgpack.Decoder(Presentation)


def supported() -> bool:
    """Abstract Unix sockets with credentials and descriptor passing: Linux."""
    return hasattr(socket, "SO_PEERCRED") and hasattr(socket, "SCM_RIGHTS") and hasattr(socket, "AF_UNIX")


def _credentials(sock: socket.socket) -> PeerIdentity:
    pid, uid, gid = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    return PeerIdentity(pid, uid, gid)


def close_fds(fds: list[int]) -> None:
    """Close descriptors received in a presentation that nothing took over."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class AttestationServer:
    """A channel's attestation socket. :meth:`invite` registers a nonce and the callback its presentations go
    to (the session's, for its whole life: a peer that registers memory later presents again)."""

    def __init__(self) -> None:
        self.name = _PREFIX + secrets.token_hex(16)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            self._sock.bind("\0" + self.name)
            self._sock.listen(64)
            self._sock.setblocking(False)
        except OSError:
            self._sock.close()
            raise
        self._handlers: dict[bytes, Callable[[Presented], None]] = {}
        self._reading = 0

    def invite(self, handler: Callable[[Presented], None]) -> Attest:
        """A fresh invitation; presentations with its nonce go to ``handler`` until :meth:`revoke`."""
        nonce = secrets.token_bytes(32)
        self._handlers[nonce] = handler
        return Attest(self.name, nonce)

    def rebind(self, nonce: bytes, handler: Callable[[Presented], None]) -> None:
        if nonce in self._handlers:
            self._handlers[nonce] = handler

    def revoke(self, nonce: bytes) -> None:
        self._handlers.pop(nonce, None)

    async def serve(self) -> None:
        """Accept presentations until cancelled (a task of the channel)."""
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[None]] = set()
        try:
            while True:
                conn, _ = await loop.sock_accept(self._sock)
                if self._reading >= _CONCURRENT:  # more strangers at once: closed unread
                    conn.close()
                    continue
                task = asyncio.create_task(self._read(conn), name="sage-attest-read")
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        finally:
            for task in tasks:
                task.cancel()
            self._sock.close()

    async def _read(self, conn: socket.socket) -> None:
        self._reading += 1
        fds: list[int] = []
        try:
            conn.setblocking(False)
            identity = _credentials(conn)
            async with asyncio.timeout(_PRESENT_TIMEOUT_S):
                data = await self._recvmsg(conn, fds)
                presentation = _decoder.decode(data)
                wanted = len(presentation.window.buffers) if presentation.window and presentation.window.shared else 0
                while len(fds) < wanted:
                    if not await self._recvmsg(conn, fds):
                        break
            if len(fds) != wanted:
                raise ProtocolError(f"presentation with {len(fds)} descriptors for {wanted} shared buffers")
            handler = self._handlers.get(presentation.nonce)
            if handler is None:
                raise ProtocolError("presentation with an unknown nonce")
        except (TimeoutError, OSError, ProtocolError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            close_fds(fds)
            log.info("attestation.refused", reason=str(exc) or type(exc).__name__)
            return
        finally:
            self._reading -= 1
            conn.close()
        handler(Presented(identity, presentation.window, fds))

    async def _recvmsg(self, conn: socket.socket, fds: list[int]) -> bytes:
        loop = asyncio.get_running_loop()
        room = socket.CMSG_SPACE(_FDS_PER_MESSAGE * 4)
        while True:
            try:
                data, ancillary, flags, _ = conn.recvmsg(_MESSAGE_BYTES, room)
                break
            except BlockingIOError:
                readable = loop.create_future()
                loop.add_reader(conn.fileno(), readable.set_result, None)
                try:
                    await readable
                finally:
                    loop.remove_reader(conn.fileno())
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                received = array.array("i")
                received.frombytes(payload[: len(payload) - len(payload) % 4])
                fds.extend(received)
        if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC) or len(fds) > _MAX_FDS:
            raise ProtocolError("presentation truncated or with too many descriptors")
        return data

    def close(self) -> None:
        self._handlers.clear()
        self._sock.close()


def _connect(name: str) -> socket.socket:
    if not _NAME.fullmatch(name):  # never connect where a peer points us unless it is a channel's socket
        raise ProtocolError(f"attestation socket {name!r} is not a sage-transport socket")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    sock.setblocking(False)  # a full backlog (a flood of strangers) fails at once instead of stalling the loop
    try:
        sock.connect("\0" + name)
    except OSError:
        sock.close()
        raise
    return sock


def listener_identity(name: str) -> tuple[socket.socket, PeerIdentity]:
    """Connect to attestation socket ``name``; returns the socket and who listens there (kernel-attested)."""
    sock = _connect(name)
    return sock, _credentials(sock)


def present(sock: socket.socket, nonce: bytes, window: Window | None, fds: list[int]) -> None:
    """Send a presentation (and ``fds``, one per buffer of a shared ``window``) on a socket from
    :func:`listener_identity`, then close it."""
    try:
        data = msgspec.msgpack.encode(Presentation(nonce, window))
        batches = [fds[i : i + _FDS_PER_MESSAGE] for i in range(0, len(fds), _FDS_PER_MESSAGE)] or [[]]
        for i, batch in enumerate(batches):
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", batch))] if batch else []
            sock.sendmsg([data if i == 0 else b"+"], ancillary)
    finally:
        sock.close()


class Attestation(NamedTuple):
    """What the exchange after the handshake established about a peer."""

    identity: PeerIdentity | None  # kernel-attested (or vouched for by the transport); None: unknown
    presented: Presented | None  # the peer's presentation on our socket (its window and memfds), if any
    peer_invite: Attest | None  # the peer's socket and nonce: where we present again (memory registered later)
    nonce: bytes | None  # our invitation's nonce (revoke it when the session ends)
    offered: bool  # we handed the peer a window on our memory


#: ``window_for(listener)``: the window (and memfds) to hand the process listening on the peer's socket, or None.
WindowOffer = Callable[[PeerIdentity], "tuple[Window, list[int]] | None"]


def present_to(invite: Attest, window_for: WindowOffer) -> bool:
    """Present ourselves on the peer's socket named in ``invite``; True when a window went with it. Raises
    ``OSError`` when the socket cannot be reached (another host or network namespace)."""
    sock, listener = listener_identity(invite.socket)
    offer = window_for(listener)
    window, fds = offer if offer is not None else (None, [])
    present(sock, invite.nonce, window, fds)
    return offer is not None


async def attest_peer(
    conn: Connection, server: AttestationServer | None, window_for: WindowOffer, *, initiator: bool
) -> Attestation:
    """Run the exchange on a connection that just passed the handshake (bounded by the caller's deadline). The
    ``initiator`` (the side that connected) says ``Attested`` first; the other side answers only once it holds the
    initiator's presentation, and can start its session at once: the initiator sends nothing before it reads that
    answer, so its first frames find the session reading."""
    creds = conn.peer_credentials()
    identity = PeerIdentity(*creds) if creds is not None else None
    invite: Attest | None = None
    waiter: asyncio.Future[Presented] | None = None
    if identity is None and server is not None:
        waiter = asyncio.get_running_loop().create_future()

        def arrived(presented: Presented, waiter: asyncio.Future[Presented] = waiter) -> None:
            if waiter.done():
                close_fds(presented.fds)
            else:
                waiter.set_result(presented)

        invite = server.invite(arrived)
    try:
        await conn.send(encode_message(invite or Attest("", secrets.token_bytes(16))))
        theirs = await expect(conn, Attest, "attestation")
        offered = presented = False
        if theirs.socket:
            try:
                offered = present_to(theirs, window_for)
                presented = True
            except OSError as exc:  # not on this host, or in another network namespace
                log.debug("attestation.unreachable", peer=conn.peer_address, error=str(exc))
        if initiator:
            await conn.send(encode_message(Attested(presented)))
        done = await expect(conn, Attested, "attestation")
        received = None
        if waiter is not None and done.presented:
            received = await waiter
            identity = received.identity
        if not initiator:
            await conn.send(encode_message(Attested(presented)))
        return Attestation(identity, received, theirs if theirs.socket else None, invite.nonce if invite else None, offered)
    except BaseException:
        if invite is not None and server is not None:
            server.revoke(invite.nonce)
        if waiter is not None and waiter.done() and not waiter.cancelled():
            close_fds(waiter.result().fds)
        raise
