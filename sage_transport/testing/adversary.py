"""The adversarial kit: a malicious peer for any transport, to run against a live channel.

:class:`Adversary` speaks our protocol well enough to get in (the handshake, with or without the token, and the
attestation exchange, honestly or not) and then sends whatever it likes: forged windows, blind acknowledgements,
oversized and negative lengths, huge plans, frames of a :class:`FrameFuzzer`. Before the handshake
:func:`raw_frames`, :func:`half_open` and :func:`slow_hello` play a stranger on the listener's TCP port (our TCP
transport and UCX's bootstrap link frame alike). :func:`fuzz` drives a fuzzer against a victim and reports what
happened; its probes prove that the victim processed each frame, so the counts are frames the victim read, not
frames the kit wrote. The victim must answer everything with a typed refusal or a closed connection and keep
serving its other peers (``ChannelStatistics.internal_errors`` stays 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from ..attest import listener_identity, present
from ..errors import ConnectionClosedError, PeerDeadError, ProtocolError, SageTransportError
from ..handshake import Capabilities, client_handshake, expect
from ..memory import KVGeometry
from ..plan import BlockMapping
from ..schema import KVCacheSchema, Layout
from ..transports.base import Connection, Transport
from ..wire import (
    MAX_CONTROL_BYTES,
    PROTOCOL_VERSION,
    Abort,
    Ack,
    Announce,
    Attest,
    Attested,
    Chunk,
    Fence,
    Hello,
    Nack,
    Placed,
    Pull,
    PullRefused,
    Region,
    Window,
    decode_message,
    encode_message,
)

__all__ = ["Adversary", "FrameFuzzer", "FuzzReport", "LegacyWindow", "fuzz", "half_open", "raw_frames", "slow_hello"]

_PREFIX = struct.Struct("<IQ")


class LegacyWindow(msgspec.Struct, frozen=True, array_like=True, tag="w"):
    """Protocol 1's ``Window``: a pid and addresses read from the message (the hole of issue 18). Sent on a
    connection it must end that connection."""

    pid: int
    host: str
    buffers: list[list[int]]
    fds: list[int] = []


class Adversary:
    """A malicious client of the channel at ``address``. ``present``: answer the victim's attestation invite
    (the kernel then attests this process; ``window`` goes with it, e.g. a forged one); otherwise it never
    presents, so without a token the victim must not trust it."""

    def __init__(
        self,
        transport: Transport,
        address: str,
        *,
        name: str | None = None,
        token: str | None = None,
        region: Region | None = None,
        present: bool = True,
        window: Window | None = None,
        fds: list[int] | None = None,
    ) -> None:
        self.transport, self.address = transport, address
        self.name = name or f"mallory-{secrets.token_hex(4)}"
        self.token, self.region = token, region
        self.present, self.window, self.fds = present, window, fds or []
        self.conn: Connection | None = None
        self.victim_invite: Attest | None = None

    async def __aenter__(self) -> Adversary:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def open(self) -> str:
        """Connect, pass the handshake and the attestation exchange; returns the victim's name."""
        conn = self.conn = await self.transport.connect(self.address)
        caps = Capabilities(integrity=["xxh3", "crc32c", "none"], memory_kinds=["cpu"], max_chunk=1 << 30)
        outcome = await client_handshake(conn, name=self.name, token=self.token, caps=caps, region=self.region)
        await conn.authenticated(MAX_CONTROL_BYTES, 1 << 40)
        await conn.send(encode_message(Attest("", secrets.token_bytes(16))))
        invite = self.victim_invite = await expect(conn, Attest, "attestation")
        presented = False
        if self.present and invite.socket:
            sock, _ = listener_identity(invite.socket)
            present(sock, invite.nonce, self.window, self.fds)
            presented = True
        await conn.send(encode_message(Attested(presented)))  # the connecting side says it first
        await expect(conn, Attested, "attestation")
        return outcome.peer_name

    async def send(self, message: Any, payload: Any = None) -> None:
        """Send a message (a wire Struct, or raw header bytes) with an optional payload."""
        assert self.conn is not None
        header = message if isinstance(message, (bytes, bytearray)) else encode_message(message)
        await self.conn.send(bytes(header), payload)

    async def recv(self, timeout: float = 5.0) -> Any:  # noqa: ASYNC109 (a test helper's bound)
        """The next message from the victim (payloads land in scratch)."""
        assert self.conn is not None
        async with asyncio.timeout(timeout):
            frame = await self.conn.recv()
        return decode_message(frame.header)

    async def recv_until(self, kind: type, timeout: float = 5.0) -> Any:  # noqa: ASYNC109
        """Skip messages until one of ``kind`` arrives."""
        deadline = time.monotonic() + timeout
        while True:
            msg = await self.recv(max(0.01, deadline - time.monotonic()))
            if isinstance(msg, kind):
                return msg

    async def closed_by_victim(self, timeout: float = 5.0) -> bool:  # noqa: ASYNC109
        """Whether the victim ends the connection within ``timeout`` (messages before that are skipped)."""
        try:
            while True:
                await self.recv(timeout)
        except (ConnectionClosedError, PeerDeadError):
            return True
        except (TimeoutError, ProtocolError):
            return False

    async def aclose(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                await self.conn.aclose()
            self.conn = None


def probe(schema: KVCacheSchema) -> Pull:
    """A pull every victim refuses at once (it asks for more pages than any memory holds): its ``PullRefused``
    proves that every frame sent before it was read."""
    return Pull(f"probe-{secrets.token_hex(6)}", schema, [BlockMapping(0, 1 << 40, (0,), (0,))], 1, None)


# ---- before the handshake: strangers on the listener's TCP port -------------------------------------------


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.removeprefix("tcp://").removeprefix("ucx://").rpartition(":")
    return host.strip("[]"), int(port)


async def raw_frames(address: str, data: bytes, *, wait_s: float = 5.0) -> bytes:
    """Connect to the listener, write ``data``, return what comes back until the listener closes (it must)."""
    host, port = _split(address)
    reader, writer = await asyncio.open_connection(host, port)
    received = bytearray()
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(wait_s):
            while chunk := await reader.read(65536):
                received += chunk
    except (ConnectionResetError, BrokenPipeError):
        pass
    finally:
        writer.close()
    return bytes(received)


async def half_open(address: str, count: int, prefix: bytes = b"") -> list[asyncio.StreamWriter]:
    """Open ``count`` connections that send ``prefix`` (e.g. a frame prefix naming a huge payload) and nothing
    more; the caller closes the writers it gets back."""
    host, port = _split(address)
    writers = []
    for _ in range(count):
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            break
        if prefix:
            writer.write(prefix)
        writers.append(writer)
    return writers


def hello_frame(name: str = "slowpoke") -> bytes:
    hello = encode_message(Hello(PROTOCOL_VERSION, name, secrets.token_bytes(32), ["xxh3"], ["cpu"], 1 << 20))
    return _PREFIX.pack(len(hello), 0) + hello


async def slow_hello(address: str, byte_every_s: float = 0.2) -> float:
    """Send a valid ``Hello`` one byte at a time; returns the seconds until the listener hung up."""
    host, port = _split(address)
    reader, writer = await asyncio.open_connection(host, port)
    start = time.monotonic()
    try:
        for byte in hello_frame():
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(byte_every_s)
            if reader.at_eof():
                break
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(60):
                while await reader.read(4096):
                    pass
    except (ConnectionError, BrokenPipeError):
        pass
    finally:
        writer.close()
    return time.monotonic() - start


# ---- fuzzing --------------------------------------------------------------------------------------------------


def _extreme(rng: random.Random, high: int = (1 << 63) - 1) -> int:
    return rng.choice([0, 1, 2, 255, 256, 4095, 1 << 20, (1 << 32) - 1, high, rng.randrange(high + 1)])


class FrameFuzzer:
    """Seeded hostile frames. :meth:`survivable` gives well-formed messages with hostile values, which a victim
    must refuse or ignore without ending the session; :meth:`fatal` gives frames after which the victim may
    (and mostly must) end it: mutated or random bytes, payloads on control messages or for chunks it never
    announced, placement it never offered, handshake messages after the handshake."""

    def __init__(self, seed: int, schema: KVCacheSchema) -> None:
        self.rng = random.Random(seed)
        self.schema = schema
        self._samples = [encode_message(m) for m in self._valid_samples()]

    def _valid_samples(self) -> list[Any]:
        s = self.schema
        mapping = BlockMapping(0, s.num_layers, (0, 1), (1, 0))
        geometry = KVGeometry(Layout.LAYER_KV_BLOCK, 4)
        announce = Announce(
            wire_id=1, transfer_id="t", schema=s, src_geometry=geometry, mappings=[mapping], chunk_size=1024,
            gather=True, progressive=False, priority=1, deadline_s=None, integrity="xxh3", num_chunks=1,
            total_bytes=1, digest=1, ack_every=1,
        )  # fmt: skip
        return [
            announce,
            Chunk(1, 0, 0, 0),
            Ack(1, [0, 1, 2]),
            Nack(1, 0, 0, "x"),
            Abort(1, True, "x"),
            Placed(1, 0, 0, 0),
            Pull("p", s, [mapping], 1, 1.0),
            PullRefused("p", "x"),
            Fence(1),
        ]

    def _mapping(self) -> BlockMapping:
        rng = self.rng
        start = rng.choice([0, 1, self.schema.num_layers - 1, self.schema.num_layers, rng.randrange(1 << 20)])
        stop = start + rng.choice([1, 2, self.schema.num_layers, 1 << 30])
        n = rng.choice([1, 2, 16, 300])
        src = tuple(_extreme(rng, (1 << 40) - 1) for _ in range(n))
        dst = tuple(dict.fromkeys(_extreme(rng, (1 << 40) - 1) for _ in range(n)))
        return BlockMapping(start, stop, src[: len(dst)], dst)

    def survivable(self) -> Any:
        rng, s = self.rng, self.schema
        kind = rng.randrange(7)
        wire_id = _extreme(rng, (1 << 32) - 1)
        if kind == 0:
            return Announce(
                wire_id=wire_id, transfer_id=f"f{rng.randrange(1 << 30)}", schema=s,
                src_geometry=KVGeometry(rng.choice(list(Layout)), rng.choice([1, 4, 1 << 20, (1 << 40) - 1])),
                mappings=[self._mapping() for _ in range(rng.choice([1, 2, 8]))], chunk_size=_extreme(rng),
                gather=rng.random() < 0.5, progressive=rng.random() < 0.5, priority=_extreme(rng, (1 << 32) - 1),
                deadline_s=rng.choice([None, 0.001, 1e9, -1.0]),
                integrity=rng.choice(["xxh3", "crc32c", "none", "md5", ""]), num_chunks=_extreme(rng),
                total_bytes=_extreme(rng), digest=_extreme(rng), ack_every=_extreme(rng, (1 << 32) - 1),
                wire_dtype=rng.choice(["", "fp8_e4m3", "int4", "bogus"]), group_size=_extreme(rng, (1 << 32) - 1),
                compression=rng.choice(["none", "lz4", "zstd", "brotli"]),
            )  # fmt: skip
        if kind == 1:
            return Ack(wire_id, [_extreme(rng) for _ in range(rng.choice([0, 1, 64, 4096]))])
        if kind == 2:
            return Nack(wire_id, _extreme(rng), _extreme(rng, (1 << 32) - 1), "x" * rng.choice([0, 1024]))
        if kind == 3:
            return Abort(wire_id, rng.random() < 0.5, "x" * rng.choice([0, 1024]))
        if kind == 4:
            return Pull(
                f"f{rng.randrange(1 << 30)}", s, [self._mapping()], _extreme(rng, (1 << 32) - 1),
                rng.choice([None, 0.001, 1e9]), rng.choice(["", "fp8_e4m3", "bogus"]),
            )  # fmt: skip
        if kind == 5:
            return PullRefused(f"f{rng.randrange(1 << 30)}", "nope")
        return Fence(wire_id)

    def fatal(self) -> tuple[bytes, bytes | None]:
        """A header (and maybe a payload) the victim may end the session for."""
        rng = self.rng
        kind = rng.randrange(6)
        if kind == 0:  # random bytes
            return rng.randbytes(rng.randint(0, 96)), None
        if kind == 1:  # a valid message, mutated
            data = bytearray(rng.choice(self._samples))
            for _ in range(rng.randint(1, 4)):
                if data and rng.random() < 0.5:
                    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
                elif data:
                    del data[rng.randrange(len(data)) :]
                data += rng.randbytes(rng.randint(0, 8))
            return bytes(data), None
        if kind == 2:  # a chunk of a transfer never announced, with a payload
            return encode_message(Chunk(_extreme(rng, (1 << 32) - 1), _extreme(rng), 0, 0)), rng.randbytes(rng.choice([1, 4096]))
        if kind == 3:  # a payload on a control message
            return encode_message(self.survivable()), b"\0" * rng.choice([1, 64])
        if kind == 4:  # placement the victim never offered, or a forged protocol-1 window
            if rng.random() < 0.5:
                return encode_message(Placed(1, 0, 0, 0)), None
            return encode_message(LegacyWindow(rng.randrange(1 << 22), "x", [[rng.randrange(1 << 47), 1 << 26]])), None
        return hello_frame()[_PREFIX.size :], None  # a handshake message after the handshake


@dataclass
class FuzzReport:
    """What a fuzz run did. ``frames``: frames the victim provably read (each batch confirmed by a probe's
    answer); ``sessions_ended``: connections the victim closed; ``hangs``: probes unanswered in time."""

    frames: int = 0
    survivable: int = 0
    fatal: int = 0
    sessions_ended: int = 0
    hangs: int = 0
    connections: int = 0
    seconds: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.seconds if self.seconds else 0.0


async def fuzz(
    make_adversary: Callable[[], Adversary],
    frames: int,
    *,
    schema: KVCacheSchema,
    seed: int = 0,
    batch: int = 64,
    fatal_share: float = 0.1,
    probe_timeout_s: float = 5.0,
) -> FuzzReport:
    """Send about ``frames`` hostile frames after the handshake: batches of survivable ones, each closed by a
    probe, and single fatal ones, each followed by a probe; reconnect whenever the victim ends the session."""
    rng = random.Random(seed)
    fuzzer = FrameFuzzer(seed, schema)
    report = FuzzReport()
    start = time.perf_counter()
    adversary: Adversary | None = None
    try:
        while report.frames < frames:
            if adversary is None:
                adversary = make_adversary()
                await adversary.open()
                report.connections += 1
            fatal = rng.random() < fatal_share
            if fatal:
                header, payload = fuzzer.fatal()
                outgoing = [(header, payload)]
            else:
                outgoing = [(encode_message(fuzzer.survivable()), None) for _ in range(batch)]
            ask = probe(schema)
            try:
                for header, payload in outgoing:
                    await adversary.send(header, payload)
                await adversary.send(ask)
                while True:
                    msg = await adversary.recv(probe_timeout_s)
                    if isinstance(msg, PullRefused) and msg.transfer_id == ask.transfer_id:
                        break
            except TimeoutError:
                report.hangs += 1
                await adversary.aclose()
                adversary = None
                continue
            except (SageTransportError, OSError) as exc:  # the victim ended the session
                report.errors[type(exc).__name__] = report.errors.get(type(exc).__name__, 0) + 1
                report.sessions_ended += 1
                await adversary.aclose()
                adversary = None
                if fatal:  # it was read: the connection ended right after it
                    report.frames += 1
                    report.fatal += 1
                continue
            report.frames += len(outgoing)
            if fatal:
                report.fatal += 1
            else:
                report.survivable += len(outgoing)
    finally:
        if adversary is not None:
            await adversary.aclose()
        report.seconds = time.perf_counter() - start
    return report
