"""A listener over an asyncio server: connections the server's callback finished setting up wait in a queue
for :meth:`~ServerListener.accept`. Shared by the UCX transport (whose server is the bootstrap link) and
the TCP transport."""

from __future__ import annotations

import asyncio
import contextlib

from ..errors import ConnectionClosedError
from .base import Connection, Listener

__all__ = ["ServerListener"]


class ServerListener(Listener):
    """``address`` is the server's bound ``host:port``; :meth:`offer` hands it an accepted connection."""

    def __init__(self, server: asyncio.Server) -> None:
        self._server = server
        bound = server.sockets[0].getsockname()
        self.address = f"{bound[0]}:{bound[1]}"
        self._queue: asyncio.Queue[Connection | None] = asyncio.Queue()
        self._closed = False

    def offer(self, conn: Connection) -> None:
        self._queue.put_nowait(conn)

    async def accept(self) -> Connection:
        if self._closed:
            raise ConnectionClosedError(f"listener {self.address} is closed")
        conn = await self._queue.get()
        if conn is None:
            self._queue.put_nowait(None)
            raise ConnectionClosedError(f"listener {self.address} is closed")
        return conn

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._server.close()
        self._queue.put_nowait(None)
        with contextlib.suppress(Exception):
            await self._server.wait_closed()
