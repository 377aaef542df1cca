"""The transport conformance kit: the contract of :class:`~sage_transport.transports.base.Connection`,
as checks any transport must pass unchanged.

A transport's tests provide a *pair factory*: an async context manager yielding a :class:`ConnectedPair`
(two connected ends and a way to kill the second end's process or endpoint). Then::

    @pytest.mark.parametrize("check", CONFORMANCE_CHECKS, ids=lambda c: c.__name__)
    async def test_conformance(check):
        await check(my_pair_factory)
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ..errors import ConnectionClosedError, PeerDeadError, ProtocolError, TransportError
from ..transports.base import Connection

__all__ = ["CONFORMANCE_CHECKS", "PAIR_LIMITS", "ConnectedPair", "PairFactory", "local_pair", "mock_pair"]


@dataclass
class ConnectedPair:
    """``a`` and ``b`` are the two ends; ``kill_b`` makes b's side die abruptly (no clean close)."""

    a: Connection
    b: Connection
    kill_b: Callable[[], Awaitable[None]]


#: ``make_pair()`` gives an authenticated pair (both ends past :meth:`Connection.authenticated`);
#: ``make_pair(authenticate=False)`` a pair as a listener first holds it, with the pre-handshake limits.
PairFactory = Callable[..., contextlib.AbstractAsyncContextManager[ConnectedPair]]

#: Limits the kit's authenticated pairs run with.
PAIR_LIMITS = (4 << 20, 1 << 40)


async def _authenticate(*conns: Connection) -> None:
    """Lift the pre-handshake limits on connected ends at once (UCX's ends exchange worker addresses)."""
    await asyncio.gather(*(conn.authenticated(*PAIR_LIMITS) for conn in conns))


def _pattern(n: int, seed: int) -> bytes:
    return bytes((i * 31 + seed) & 0xFF for i in range(min(n, 4096))) * (n // 4096) + bytes(
        (i * 31 + seed) & 0xFF for i in range(n % 4096)
    )


class _Failure(AssertionError):
    pass


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise _Failure(message)


async def check_ordering(make_pair: PairFactory) -> None:
    """Frames arrive whole and in send order, headers and payloads intact."""
    async with make_pair() as pair:
        sizes = [0, 1, 7, 4096, 8193, 65536, 3]

        async def sender() -> None:
            for i in range(140):
                size = sizes[i % len(sizes)]
                await pair.a.send(b"frame-%d" % i, _pattern(size, i) if i % 5 else None)

        task = asyncio.create_task(sender())
        for i in range(140):
            frame = await pair.b.recv()
            _require(frame.header == b"frame-%d" % i, f"frame {i} arrived as {frame.header[:20]!r}")
            if i % 5:
                _require(
                    frame.payload is not None and bytes(frame.payload) == _pattern(sizes[i % len(sizes)], i),
                    f"payload {i} differs",
                )
            else:
                _require(frame.payload is None, f"header-only frame {i} grew a payload")
        await task


async def check_empty_payload(make_pair: PairFactory) -> None:
    """An empty payload is an empty buffer, not absent; a header-only frame has ``payload is None``."""
    async with make_pair() as pair:
        await pair.a.send(b"empty", b"")
        await pair.a.send(b"none")
        first, second = await pair.b.recv(), await pair.b.recv()
        _require(first.payload is not None and first.payload.nbytes == 0, "empty payload did not arrive as 0 bytes")
        _require(second.payload is None, "header-only frame arrived with a payload")


async def check_large_payload_into_sink(make_pair: PairFactory) -> None:
    """A 64 MiB payload lands in the sink's buffer, which is the buffer returned."""
    size = 64 << 20
    async with make_pair() as pair:
        data = bytearray(_pattern(size, 5))
        target = bytearray(size)
        seen: list[tuple[bytes, int]] = []

        def sink(header: bytes, nbytes: int) -> Any:
            seen.append((header, nbytes))
            return target

        send = asyncio.create_task(pair.a.send(b"big", data))
        frame = await pair.b.recv(sink)
        await send
        _require(seen == [(b"big", size)], f"sink saw {seen!r}")
        _require(target == data, "payload did not land in the sink's buffer")
        _require(frame.payload is not None and frame.payload.nbytes == size, "frame payload has the wrong size")
        frame.payload[0] ^= 0xFF  # type: ignore[index]
        _require(target[0] != data[0], "returned payload is not the sink's buffer")


async def check_buffer_kinds(make_pair: PairFactory) -> None:
    """bytes, bytearray, memoryview slices, numpy arrays and torch CPU tensors are all sendable as-is."""
    payloads: list[tuple[str, Any, bytes]] = []
    raw = _pattern(10000, 9)
    payloads += [
        ("bytes", raw, raw),
        ("bytearray", bytearray(raw), raw),
        ("memoryview", memoryview(raw)[100:5100], raw[100:5100]),
    ]
    if importlib.util.find_spec("numpy"):
        import numpy as np

        arr = np.arange(24 * 1000, dtype=np.float16).reshape(24, 1000)
        payloads.append(("numpy", arr, arr.tobytes()))
    if importlib.util.find_spec("torch"):
        import torch

        t = torch.arange(3000, dtype=torch.bfloat16).reshape(3, 1000)
        payloads.append(("torch", t, t.view(torch.uint8).numpy().tobytes()))
    async with make_pair() as pair:
        for name, payload, expected in payloads:
            send = asyncio.create_task(pair.a.send(name.encode(), payload))
            frame = await pair.b.recv()
            await send
            _require(frame.header == name.encode(), f"{name}: header {frame.header!r}")
            _require(frame.payload is not None and bytes(frame.payload) == expected, f"{name}: bytes differ")


async def check_sink_errors(make_pair: PairFactory) -> None:
    """A sink's own error propagates and the frame is consumed; a wrong-sized sink buffer is a ProtocolError."""
    async with make_pair() as pair:
        sends = asyncio.gather(
            pair.a.send(b"one", b"x" * 100), pair.a.send(b"two", b"y" * 100), pair.a.send(b"three", b"z" * 100)
        )

        def failing(header: bytes, nbytes: int) -> Any:
            raise KeyError("no room")

        try:
            await pair.b.recv(failing)
            raise _Failure("a failing sink did not raise")
        except KeyError:
            pass
        try:
            await pair.b.recv(lambda h, n: bytearray(n + 1))
            raise _Failure("a wrong-sized sink buffer was accepted")
        except ProtocolError:
            pass
        frame = await pair.b.recv()
        _require(frame.header == b"three" and bytes(frame.payload or b"") == b"z" * 100, "stream broke after sink errors")
        await sends


async def check_close_and_eof(make_pair: PairFactory) -> None:
    """Frames sent before a clean close still arrive; then ``recv`` raises ConnectionClosedError, and
    sending on a closed connection raises it too."""
    async with make_pair() as pair:
        await pair.a.send(b"last", b"bye")
        await pair.a.aclose()
        frame = await pair.b.recv()
        _require(frame.header == b"last", "frame sent before close was lost")
        try:
            await asyncio.wait_for(pair.b.recv(), 5)
            raise _Failure("recv after the peer closed returned a frame")
        except ConnectionClosedError:
            pass
        try:
            await pair.a.send(b"after")
            raise _Failure("send on a closed connection succeeded")
        except ConnectionClosedError:
            pass


async def check_cancelled_send_leaves_nothing(make_pair: PairFactory) -> None:
    """A send cancelled before the peer took it leaves no partial frame: the next frame arrives intact."""
    async with make_pair() as pair:
        big = bytearray(_pattern(32 << 20, 3))
        send = asyncio.create_task(pair.a.send(b"cancelled", big))
        await asyncio.sleep(0)
        send.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await send
        await pair.a.send(b"next", b"intact")
        frame = await pair.b.recv()
        if frame.header == b"cancelled":  # the transport had already sent it whole: acceptable
            _require(frame.payload is not None and frame.payload == big, "a cancelled send arrived partially")
            frame = await pair.b.recv()
        _require(
            frame.header == b"next" and bytes(frame.payload or b"") == b"intact",
            f"stream corrupted after cancel: {frame.header[:20]!r}",
        )


async def check_peer_death(make_pair: PairFactory) -> None:
    """When the peer dies, a pending ``recv`` and later sends raise PeerDeadError (not hang, not EOF)."""
    async with make_pair() as pair:
        pending = asyncio.create_task(pair.a.recv())
        await asyncio.sleep(0.01)
        await pair.kill_b()
        try:
            await asyncio.wait_for(pending, 5)
            raise _Failure("recv returned a frame from a dead peer")
        except PeerDeadError:
            pass
        try:
            async with asyncio.timeout(5):
                for _ in range(1000):
                    await pair.a.send(b"to-the-dead", b"x" * 1024)
                    await asyncio.sleep(0.005)
            raise _Failure("sending to a dead peer kept succeeding")
        except (PeerDeadError, ConnectionClosedError) as exc:
            _require(isinstance(exc, TransportError), "wrong error family")


async def check_concurrent_senders(make_pair: PairFactory) -> None:
    """Several tasks sending at once never interleave frames."""
    async with make_pair() as pair:

        async def sender(k: int) -> None:
            for i in range(30):
                await pair.a.send(b"%d:%d" % (k, i), bytes([k]) * (1000 + 5000 * (i % 3)))

        tasks = [asyncio.create_task(sender(k)) for k in range(4)]
        last = {k: -1 for k in range(4)}
        for _ in range(120):
            frame = await pair.b.recv()
            k, i = (int(x) for x in frame.header.split(b":"))
            _require(i == last[k] + 1, f"sender {k}: frame {i} after {last[k]}")
            last[k] = i
            _require(
                frame.payload is not None and bytes(frame.payload) == bytes([k]) * (1000 + 5000 * (i % 3)), "interleaved payload"
            )
        await asyncio.gather(*tasks)


async def check_gathered_payloads(make_pair: PairFactory) -> None:
    """A connection that ``gathers`` sends a payload given as a list of views as one payload, their bytes back to
    back, in order with frames sent whole, also with more views than one system call takes, and fills a sink's
    list of buffers one after the other (cut elsewhere than the sender's); one that does not gathers nothing (the
    check passes: the session stages for it)."""
    async with make_pair() as pair:
        if not pair.a.gathers:
            return
        rng = random.Random(7)
        store = bytes(rng.randbytes(4 << 20))
        lists = []
        for count in (1, 3, 1500, 300):
            starts = [rng.randrange(0, len(store) - 4096) for _ in range(count)]
            lists.append([memoryview(store)[s : s + rng.randrange(1, 4096)] for s in starts])

        async def sender() -> None:
            for i, views in enumerate(lists):
                await pair.a.send(b"g%d" % i, views)
                await pair.a.send(b"plain%d" % i, b"x" * i)

        task = asyncio.ensure_future(sender())
        for i, views in enumerate(lists):
            want = b"".join(bytes(v) for v in views)
            landing = bytearray(len(want))
            # even frames into pieces of 1..3000 bytes (where the receiving end scatters), odd ones into one buffer
            scatter = i % 2 == 0 and pair.b.gathers

            def sink(header: bytes, nbytes: int, landing: bytearray = landing, scatter: bool = scatter) -> Any:
                if not scatter:
                    return None
                cuts, pos = [], 0
                while pos < nbytes:
                    step = min(nbytes - pos, rng.randrange(1, 3000))
                    cuts.append(memoryview(landing)[pos : pos + step])
                    pos += step
                return cuts

            frame = await pair.b.recv(sink)
            _require(frame.header == b"g%d" % i, f"gathered frame {i} arrived as {frame.header[:20]!r}")
            got = bytes(landing) if scatter else bytes(frame.payload or b"")
            _require(frame.payload is not None and got == want, f"gathered payload {i} differs")
            _require(not scatter or type(frame.payload) is list, "a scattered payload did not come back as its pieces")
            plain = await pair.b.recv()
            _require(plain.header == b"plain%d" % i and bytes(plain.payload or b"") == b"x" * i, "frame after a gathered one")
        await task
        _require(pair.a.statistics().bytes_sent >= sum(sum(v.nbytes for v in views) for views in lists), "bytes not counted")


async def check_limits_before_authentication(make_pair: PairFactory) -> None:
    """Before the handshake a frame with a payload, or a header over the handshake limit, never arrives: the
    sender refuses it or the receiver ends the connection with a typed error, allocating nothing for it."""
    from ..transports.base import HANDSHAKE_FRAME_LIMIT

    for header, payload in ((b"h", bytes(1 << 20)), (b"x" * (HANDSHAKE_FRAME_LIMIT + 1), None)):
        async with make_pair(authenticate=False) as pair:
            await pair.a.send(b"hello")  # a small header-only frame passes
            frame = await pair.b.recv()
            _require(frame.header == b"hello" and frame.payload is None, "a handshake-sized frame did not arrive")
            send = asyncio.ensure_future(pair.a.send(header, payload))  # may wait for the receiver (rendezvous)
            try:
                async with asyncio.timeout(10):
                    got = await pair.b.recv()
            except (ProtocolError, TransportError):
                got = None
            except TimeoutError:  # nothing arrived: the sender must have refused it
                got = None
                refused = send.done() and isinstance(send.exception(), (ProtocolError, TransportError))
                _require(refused, "nothing arrived and the sender did not refuse it")
            with contextlib.suppress(ProtocolError, TransportError):
                async with asyncio.timeout(10):
                    await send
            _require(got is None, f"a {len(header)}-byte header (payload: {payload is not None}) arrived before the handshake")


CONFORMANCE_CHECKS: list[Callable[[PairFactory], Awaitable[None]]] = [
    check_ordering,
    check_empty_payload,
    check_large_payload_into_sink,
    check_buffer_kinds,
    check_sink_errors,
    check_close_and_eof,
    check_cancelled_send_leaves_nothing,
    check_peer_death,
    check_concurrent_senders,
    check_gathered_payloads,
    check_limits_before_authentication,
]


@contextlib.asynccontextmanager
async def mock_pair(*, authenticate: bool = True, **network_options: Any) -> AsyncIterator[ConnectedPair]:
    """A connected pair over a fresh :class:`~sage_transport.transports.mock.MockNetwork`."""
    from ..transports.mock import MockNetwork, MockTransport

    network = MockNetwork(**network_options)
    server, client = MockTransport(network, name="b"), MockTransport(network, name="a")
    listener = await server.listen()
    a = await client.connect(listener.address)
    b = await listener.accept()
    if authenticate:
        await _authenticate(a, b)

    async def kill_b() -> None:
        network.kill(server.address)

    try:
        yield ConnectedPair(a, b, kill_b)
    finally:
        await a.aclose()
        await b.aclose()
        await listener.aclose()


@contextlib.asynccontextmanager
async def local_pair(transport: str, *, authenticate: bool = True, **options: Any) -> AsyncIterator[ConnectedPair]:
    """A pair between two instances of a registered transport in this process; ``kill_b`` calls b's
    ``abort()`` (reset, no goodbye), which the transport's connections must provide."""
    from ..transports.registry import get_transport_class

    cls = get_transport_class(transport)
    server, client = cls(**options), cls(**options)
    listener = await server.listen()
    try:
        a = await client.connect(listener.address)
        async with asyncio.timeout(30):
            b = await listener.accept()
            if authenticate:
                await _authenticate(a, b)

        async def kill_b() -> None:
            b.abort()  # type: ignore[attr-defined]

        try:
            yield ConnectedPair(a, b, kill_b)
        finally:
            await a.aclose()
            await b.aclose()
    finally:
        await listener.aclose()
        await client.aclose()
        await server.aclose()
