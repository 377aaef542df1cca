"""Run one end of a connection in a separate process, so the conformance kit checks a transport between
two processes unchanged.

:func:`remote_pair` listens here, starts ``python -m sage_transport.testing.remote`` which connects back
with the same transport, and yields a :class:`~sage_transport.testing.conformance.ConnectedPair` whose
``a`` is the real local connection and whose ``b`` is a :class:`RemoteConnection` driving the child's
connection over its stdin/stdout. ``kill_b`` sends SIGKILL to the child. The child's payloads cross the
pipe as bytes; the local sink contract of ``b.recv`` is applied here (the real zero-copy receive into a
sink is exercised on ``a`` and by the channel's cross-process tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import struct
import sys
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from .. import errors
from ..errors import ProtocolError
from ..memory import as_byte_view
from ..transports.base import Connection, ConnectionStatistics, Frame, PayloadSink
from ..transports.registry import get_transport_class
from .conformance import PAIR_LIMITS, ConnectedPair

__all__ = ["RemoteConnection", "remote_pair"]

_LEN = struct.Struct("<I")


class _Command(msgspec.Struct, array_like=True):
    id: int
    op: str
    header: bytes = b""
    payload: bytes | None = None


class _Reply(msgspec.Struct, array_like=True):
    id: int
    header: bytes = b""
    payload: bytes | None = None
    error: str = ""
    message: str = ""
    stats: list[int] = []


async def _read_message(reader: asyncio.StreamReader, kind: type[Any]) -> Any:
    (size,) = _LEN.unpack(await reader.readexactly(4))
    return msgspec.msgpack.decode(await reader.readexactly(size), type=kind)


def _write_message(writer: Any, message: Any) -> None:
    data = msgspec.msgpack.encode(message)
    writer.write(_LEN.pack(len(data)) + data)


class RemoteConnection(Connection):
    """A :class:`Connection` whose real end lives in a child process."""

    def __init__(self, process: asyncio.subprocess.Process, local: str, peer: str) -> None:
        self.process = process
        self.local_address, self.peer_address = local, peer
        self._ids = itertools.count(1)
        self._waiters: dict[int, asyncio.Future[_Reply]] = {}
        self._reader_task = asyncio.create_task(self._read_replies())

    async def _read_replies(self) -> None:
        assert self.process.stdout is not None
        try:
            while True:
                reply = await _read_message(self.process.stdout, _Reply)
                waiter = self._waiters.pop(reply.id, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(reply)
        except (asyncio.IncompleteReadError, ConnectionError):
            for waiter in self._waiters.values():
                if not waiter.done():
                    waiter.set_exception(errors.PeerDeadError("the remote peer process is gone"))
            self._waiters.clear()

    async def _call(self, op: str, header: bytes = b"", payload: bytes | None = None) -> _Reply:
        if self._reader_task.done():
            raise errors.PeerDeadError("the remote peer process is gone")
        command = _Command(next(self._ids), op, header, payload)
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[command.id] = waiter
        assert self.process.stdin is not None
        _write_message(self.process.stdin, command)
        reply: _Reply = await waiter
        if reply.error:
            cls = getattr(errors, reply.error, None)
            if not (isinstance(cls, type) and issubclass(cls, Exception)):
                cls = errors.TransportError
            raise cls(f"[remote] {reply.message}")
        return reply

    async def send(self, header: bytes, payload: Any = None) -> None:
        await self._call("send", header, None if payload is None else as_byte_view(payload).tobytes())

    async def recv(self, sink: PayloadSink | None = None) -> Frame:
        reply = await self._call("recv")
        if reply.payload is None:
            return Frame(reply.header, None)
        nbytes = len(reply.payload)
        target = sink(reply.header, nbytes) if sink is not None else None
        view = as_byte_view(bytearray(nbytes) if target is None else target, writable=True)
        if view.nbytes != nbytes:
            raise ProtocolError(f"sink gave {view.nbytes} bytes for a {nbytes}-byte payload")
        view[:] = reply.payload
        return Frame(reply.header, view)

    def statistics(self) -> ConnectionStatistics:
        return ConnectionStatistics(0, 0, 0, 0)

    async def aclose(self) -> None:
        if self.process.returncode is None and not self._reader_task.done():
            with contextlib.suppress(errors.SageTransportError):
                await self._call("close")


@contextlib.asynccontextmanager
async def remote_pair(transport: str, *, authenticate: bool = True, **options: Any) -> AsyncIterator[ConnectedPair]:
    """A pair over ``transport`` (a registered name, built with ``options``) between this process and a child."""
    local_transport = get_transport_class(transport)(**options)
    listener = await local_transport.listen()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sage_transport.testing.remote",
        transport,
        json.dumps(options),
        listener.address,
        "1" if authenticate else "0",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "UCX_WARN_UNUSED_ENV_VARS": "n"},
    )
    try:
        async with asyncio.timeout(30):
            a = await listener.accept()
            if authenticate:  # the child lifts its end's limits as soon as it connected
                await a.authenticated(*PAIR_LIMITS)
        b = RemoteConnection(process, a.peer_address, a.local_address)

        async def kill_b() -> None:
            process.kill()
            await process.wait()

        try:
            yield ConnectedPair(a, b, kill_b)
        finally:
            await b.aclose()
            await a.aclose()
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
        await listener.aclose()
        await local_transport.aclose()


async def _serve(transport: str, options: dict[str, Any], address: str, authenticate: bool) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin.buffer)
    replies = os.fdopen(os.dup(1), "wb")  # replies get their own descriptor: C libraries may print to fd 1
    os.dup2(2, 1)
    out_transport, out_protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, replies)
    writer = asyncio.StreamWriter(out_transport, out_protocol, None, loop)
    real = get_transport_class(transport)(**options)
    conn = await real.connect(address)
    if authenticate:
        await conn.authenticated(*PAIR_LIMITS)
    done = asyncio.Event()

    async def handle(command: _Command) -> None:
        reply = _Reply(command.id)
        try:
            if command.op == "send":
                await conn.send(command.header, command.payload)
            elif command.op == "recv":
                frame = await conn.recv()
                reply.header = frame.header
                reply.payload = None if frame.payload is None else bytes(frame.payload)
            elif command.op == "close":
                await conn.aclose()
                done.set()
        except Exception as exc:
            reply.error, reply.message = type(exc).__name__, str(exc)
        _write_message(writer, reply)

    tasks = set()
    read = asyncio.ensure_future(_read_message(reader, _Command))
    closing = asyncio.ensure_future(done.wait())
    while not done.is_set():
        finished, _ = await asyncio.wait({read, closing}, return_when=asyncio.FIRST_COMPLETED)
        if read in finished:
            try:
                command = read.result()
            except asyncio.IncompleteReadError:
                break
            task = asyncio.create_task(handle(command))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            read = asyncio.ensure_future(_read_message(reader, _Command))
    await writer.drain()
    await real.aclose()


if __name__ == "__main__":
    asyncio.run(_serve(sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"))
