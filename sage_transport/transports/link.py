"""A TCP side channel: bootstraps a connection and watches the peer's liveness.

Transports whose data path cannot report a dead peer (UCX shared memory and CMA endpoints run without
peer error handling) keep one of these per connection. After a one-message exchange each way, both sides
send a heartbeat byte every ``interval_s``; the watcher declares the peer dead on end-of-stream without a
goodbye, on a reset, or when nothing arrived for ``timeout_s``. A killed process's kernel closes the
socket at once, so same-host death is noticed within a round trip, not a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable

from ..errors import ConfigError, FrameTooLargeError, PeerDeadError

__all__ = ["Link", "open_link", "parse_host_port"]

_HEARTBEAT, _GOODBYE = b"H", b"G"
_MAX_BLOB = 1 << 20


def parse_host_port(address: str, field: str = "address") -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` → ``(host, port)``; errors name the field and the value."""
    text = address.strip()
    for prefix in ("ucx://", "tcp://"):
        text = text.removeprefix(prefix)
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{field}={address!r} is not HOST:PORT")
    return host, int(port)


class Link:
    """One side of a bootstrap/liveness socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = writer.get_extra_info("peername") or ("?", 0)
        local = writer.get_extra_info("sockname") or ("?", 0)
        self.peer_address = f"{peer[0]}:{peer[1]}"
        self.local_address = f"{local[0]}:{local[1]}"
        self.goodbye_received = False
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    async def send_blob(self, data: bytes) -> None:
        self._writer.write(struct.pack("<I", len(data)) + data)
        await self._writer.drain()

    async def send_raw(self, data: bytes) -> None:
        """Write ``data`` as it is (a connection's frames before its handshake completed)."""
        try:
            self._writer.write(data)
            await self._writer.drain()
        except (ConnectionError, RuntimeError) as exc:
            raise PeerDeadError(f"{self.peer_address} hung up during connection set-up") from exc

    async def recv_exactly(self, nbytes: int) -> bytes:
        try:
            return await self._reader.readexactly(nbytes)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise PeerDeadError(f"{self.peer_address} hung up during connection set-up") from exc

    async def recv_blob(self) -> bytes:
        try:
            (size,) = struct.unpack("<I", await self._reader.readexactly(4))
            if size > _MAX_BLOB:
                raise FrameTooLargeError(f"bootstrap message of {size} bytes from {self.peer_address} exceeds {_MAX_BLOB}")
            return await self._reader.readexactly(size)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise PeerDeadError(f"{self.peer_address} hung up during connection set-up") from exc

    def watch(self, interval_s: float, timeout_s: float, on_dead: Callable[[str], None], on_goodbye: Callable[[], None]) -> None:
        """Start heartbeats and the watcher; exactly one of the callbacks fires, at most once."""
        self._tasks = [
            asyncio.create_task(self._beat(interval_s), name=f"sage-link-beat-{self.peer_address}"),
            asyncio.create_task(self._watch(timeout_s, on_dead, on_goodbye), name=f"sage-link-watch-{self.peer_address}"),
        ]

    async def _beat(self, interval_s: float) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            while not self._writer.is_closing():
                self._writer.write(_HEARTBEAT)
                await asyncio.sleep(interval_s)

    async def _watch(self, timeout_s: float, on_dead: Callable[[str], None], on_goodbye: Callable[[], None]) -> None:
        while True:
            try:
                async with asyncio.timeout(timeout_s):
                    data = await self._reader.read(64)
            except TimeoutError:
                on_dead(f"no heartbeat from {self.peer_address} for {timeout_s:g} s")
                return
            except ConnectionError as exc:
                on_dead(f"link to {self.peer_address} reset: {exc}")
                return
            if not data:
                if not self._closed:
                    on_dead(f"{self.peer_address} went away without a goodbye")
                return
            if _GOODBYE in data:
                self.goodbye_received = True
                on_goodbye()
                return

    async def goodbye(self) -> None:
        """Tell the peer this is a clean close, then close."""
        if self._closed:
            return
        with contextlib.suppress(ConnectionError, RuntimeError):
            self._writer.write(_GOODBYE)
        await self.close()

    def abort(self) -> None:
        """Close with a reset and no goodbye, as a crashed process would."""
        sock = self._writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._closed = True
        self._writer.transport.abort()
        for task in self._tasks:
            task.cancel()

    async def close(self) -> None:
        self._closed = True
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()
        self._writer.close()
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self._writer.wait_closed()


async def open_link(host: str, port: int, timeout_s: float) -> Link:
    """Connect a link to ``host:port``; PeerDeadError when nothing answers within ``timeout_s``."""
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError) as exc:
        raise PeerDeadError(f"nothing answers at {host}:{port}: {exc or 'timed out'}") from exc
    return Link(reader, writer)
