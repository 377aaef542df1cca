"""A listener over an asyncio server: connections the server's callback finished setting up wait in a queue
for :meth:`~ServerListener.accept`. Shared by the UCX transport (whose server is the bootstrap link) and
the TCP transport."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from ..errors import ConnectionClosedError
from .base import Connection, Listener

__all__ = ["ServerListener"]


class ServerListener(Listener):
    """``address`` is the server's bound ``host:port``. Build it with :meth:`open`."""

    def __init__(self, server: asyncio.Server, queue: asyncio.Queue[Connection | None]) -> None:
        self._server = server
        bound = server.sockets[0].getsockname()
        self.address = f"{bound[0]}:{bound[1]}"
        self._queue = queue
        self._closed = False

    @classmethod
    async def open(
        cls, start: Callable[[Callable[[Connection], None]], Awaitable[asyncio.Server]], host: str, port: int
    ) -> ServerListener:
        """``start(offer)`` starts the server; its callbacks call ``offer(conn)`` for each connection set up."""
        queue: asyncio.Queue[Connection | None] = asyncio.Queue()
        try:
            server = await start(queue.put_nowait)
        except OSError as exc:
            raise ConnectionClosedError(f"cannot listen on {host}:{port}: {exc}") from exc
        return cls(server, queue)

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
        self._server.close()  # the listening sockets close here
        self._queue.put_nowait(None)
        # Not Server.wait_closed(): from Python 3.12 it also waits for every connection the server accepted to
        # close, and those are the channel's sessions, which it ends only after its listeners (two channels of
        # one process waited on each other for ever). The connections are the channel's to close.
        await asyncio.sleep(0)
