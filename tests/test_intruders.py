"""Bad input and intruders (issue 7, promises 5 and 6): the wire decoder under 10^5 hostile inputs, raw-socket
garbage on live listeners, silent and replaying clients, and nothing disclosed before the token is proven."""

from __future__ import annotations

import asyncio
import os
import random
import struct

import pytest

from sage_transport import KVMemory, KVTransferChannel, KVTransportConfig, TransferPlan, kernels
from sage_transport.errors import AuthError, ConfigError, FrameTooLargeError, ProtocolError
from sage_transport.handshake import PROTOCOL_VERSION
from sage_transport.wire import (
    MAX_CONTROL_BYTES,
    Ack,
    Chunk,
    Hello,
    Nack,
    Placed,
    Reject,
    Welcome,
    decode_message,
    encode_message,
)

from .conftest import SMALL, filled, rss_bytes

#: Inputs the decoder gets in CI; SAGE_FUZZ_N raises it for longer runs (documented in bench/RELIABILITY.md).
FUZZ_N = int(os.environ.get("SAGE_FUZZ_N", "100000"))
TOKEN = "intruder-test-token-Hn3Vb7Qx2Lm9Kp4Z"


def _samples() -> list[bytes]:
    return [
        encode_message(Hello(PROTOCOL_VERSION, "peer", b"n" * 32, ["xxh3"], ["cpu"], 1 << 20)),
        encode_message(Chunk(3, 7, 1, 0xDEADBEEF)),
        encode_message(Ack(3, [1, 2, 3, 4])),
        encode_message(Nack(3, 5, 2, "checksum mismatch")),
        encode_message(Placed(3, 9, 1, 42)),
        encode_message(Reject("no")),
    ]


def test_the_decoder_survives_a_hundred_thousand_hostile_inputs() -> None:
    """Random bytes and mutated valid messages (bit flips, truncations, extensions, splices): every input decodes
    to a message or raises ProtocolError/FrameTooLargeError, never anything else."""
    rng = random.Random(20261126)
    samples = _samples()
    outcomes = {"decoded": 0, "refused": 0}
    for i in range(FUZZ_N):
        if i % 2:
            data = bytearray(rng.choice(samples))
            for _ in range(rng.randint(1, 4)):
                kind = rng.randrange(4)
                if kind == 0 and data:
                    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
                elif kind == 1 and data:
                    del data[rng.randrange(len(data)) :]
                elif kind == 2:
                    data += rng.randbytes(rng.randint(1, 16))
                else:
                    data[rng.randrange(len(data) + 1) : rng.randrange(len(data) + 1)] = rng.randbytes(rng.randint(0, 8))
            data = bytes(data)
        else:
            data = rng.randbytes(rng.randint(0, 96))
        try:
            decode_message(data)
        except (ProtocolError, FrameTooLargeError):
            outcomes["refused"] += 1
        else:
            outcomes["decoded"] += 1
    assert outcomes["refused"] + outcomes["decoded"] == FUZZ_N
    assert outcomes["refused"] > FUZZ_N // 2  # the fuzzer mostly produced garbage, and it was all refused cleanly
    with pytest.raises(FrameTooLargeError):
        decode_message(b"\x00" * (MAX_CONTROL_BYTES + 1))


async def _raw(address: str, payload: bytes, *, wait_s: float = 5.0) -> bytes:
    """Connect, send ``payload``, and return what the server sends until it closes (it must close)."""
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    received = bytearray()
    try:
        writer.write(payload)
        await writer.drain()
        async with asyncio.timeout(wait_s):
            while data := await reader.read(65536):  # until EOF: the server closed this connection
                received += data
    except (ConnectionResetError, BrokenPipeError):
        pass  # closed with a reset: closed all the same
    finally:
        writer.close()
    return bytes(received)


@pytest.mark.parametrize("transport", ["tcp", "ucx"])
async def test_garbage_on_a_live_listener_closes_that_connection_only(transport: str) -> None:
    config = KVTransportConfig(chunk_size=1024, connect_timeout_s=1.0)
    async with (
        KVTransferChannel(transport, config, name="victim") as victim,
        KVTransferChannel(transport, config, name="friend") as friend,
    ):
        dst = KVMemory.allocate(SMALL, 16, fill=0)
        victim.register(dst)
        friend.register(filled(SMALL, 16))
        address = await victim.listen()
        peer = await friend.connect(address)
        await asyncio.to_thread(kernels.warm_up)  # the data path's compiled loops load in the background: not garbage
        rss = rss_bytes()
        rng = random.Random(7)
        attacks = [
            rng.randbytes(4096),  # noise
            struct.pack("<IQ", 0x7FFFFFFF, 0) + b"x" * 64,  # a header length far past any bound
            struct.pack("<IQ", 16, 1 << 60) + b"\x92" * 16,  # an absurd payload length
            struct.pack("<IQ", 40, 0) + b"\x93\x01",  # a truncated frame, then the client goes away
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            struct.pack(">I", 0xFFFFFFFF) + b"\xff" * 32,  # a big-endian length prefix
        ]
        for attack in attacks:
            await _raw(address, attack)
        assert victim.peers == ["friend"]
        assert rss_bytes() - rss < 64 << 20, "garbage made the process grow"
        result = await friend.transfer(TransferPlan.for_blocks(peer, SMALL, range(16), range(16), transfer_id="after"))
        assert result.chunks > 0 and victim.peers == ["friend"]


async def test_a_silent_client_is_dropped_within_the_handshake_timeout() -> None:
    config = KVTransportConfig(connect_timeout_s=0.5, auth_token=TOKEN)
    async with KVTransferChannel("tcp", config, name="server") as server:
        address = await server.listen()
        loop = asyncio.get_running_loop()
        start = loop.time()
        data = await _raw(address, b"")  # connect and stay silent
        assert loop.time() - start < 2.0, "the silent client was not dropped in time"
        assert all(not isinstance(f, Welcome) for f in _frames(data))  # closed, having told it nothing
        assert server.peers == []


async def test_a_replayed_handshake_is_refused() -> None:
    """Record a good client's bytes to the server through a relay, then replay them on a new connection: the
    server's fresh nonce makes the recorded proof worthless."""
    config = KVTransportConfig(auth_token=TOKEN, connect_timeout_s=2.0)
    async with KVTransferChannel("tcp", config, name="server") as server:
        server.register(KVMemory.allocate(SMALL, 4, fill=0))
        address = await server.listen()
        host, port = address.rsplit(":", 1)
        recorded = bytearray()
        recording = [True]  # the handshake only: Hello and Proof

        async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            up_r, up_w = await asyncio.open_connection(host, int(port))

            async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, record: bool) -> None:
                while data := await src.read(65536):
                    if record and recording[0]:
                        recorded.extend(data)
                    dst.write(data)
                    await dst.drain()
                dst.close()

            await asyncio.gather(pipe(reader, up_w, True), pipe(up_r, writer, False), return_exceptions=True)

        proxy = await asyncio.start_server(relay, "127.0.0.1", 0)
        relay_port = proxy.sockets[0].getsockname()[1]
        async with proxy:
            async with KVTransferChannel("tcp", config, name="client") as client:
                assert await client.connect(f"127.0.0.1:{relay_port}") == "server"
                recording[0] = False
            for _ in range(100):  # the genuine client is gone; its name is free again
                if not server.peers:
                    break
                await asyncio.sleep(0.02)
            assert server.peers == [] and len(recorded) > 0
            answer = await _raw(address, bytes(recorded))
        frames = _frames(answer)
        assert isinstance(frames[0], Welcome) and frames[0].region is None  # nothing about the memory yet
        assert isinstance(frames[-1], Reject) and "auth failed" in frames[-1].reason, frames
        assert server.peers == []


def _frames(data: bytes) -> list[object]:
    out: list[object] = []
    pos = 0
    while pos + 12 <= len(data):
        hlen, plen = struct.unpack_from("<IQ", data, pos)
        pos += 12
        if hlen:  # a zero-length header is the transport's goodbye
            out.append(decode_message(data[pos : pos + hlen]))
        pos += hlen + max(0, plen - 1)
    return out


async def test_a_client_without_the_token_learns_nothing_about_the_memory() -> None:
    async with (
        KVTransferChannel("tcp", KVTransportConfig(auth_token=TOKEN), name="server") as server,
        KVTransferChannel("tcp", KVTransportConfig(), name="stranger") as stranger,
    ):
        server.register(KVMemory.allocate(SMALL, 4, fill=0))
        address = await server.listen()
        with pytest.raises(AuthError, match="requires a token we were not given"):
            await stranger.connect(address)
        hello = encode_message(Hello(PROTOCOL_VERSION, "probe", b"\x01" * 32, ["xxh3"], ["cpu"], 1 << 20))
        answer = await _raw(address, struct.pack("<IQ", len(hello), 0) + hello + b"\x00" * 12, wait_s=5)
        welcome = _frames(answer)[0]
        assert isinstance(welcome, Welcome) and welcome.region is None
        assert server.peers == []


async def test_a_bit_flipping_relay_is_caught_chunk_by_chunk_and_the_data_arrives_intact() -> None:
    """A TCP relay between two channels flips one bit in ~5% of chunk payloads (frame headers untouched): every
    flip is caught by the receiver's checksum, the chunk is sent again, and the transfer is byte-identical."""
    import numpy as np

    rng = random.Random(3)
    flipped = [0]
    config = KVTransportConfig(chunk_size=1024, max_retries=5, direct_placement=False)
    async with (
        KVTransferChannel("tcp", config, name="receiver") as receiver,
        KVTransferChannel("tcp", config, name="sender") as sender,
    ):
        src, dst = filled(SMALL, 64), KVMemory.allocate(SMALL, 64, fill=0)
        sender.register(src)
        receiver.register(dst)
        host, port = (await receiver.listen()).rsplit(":", 1)

        async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            up_r, up_w = await asyncio.open_connection(host, int(port))

            async def upstream() -> None:  # sender → receiver: parse frames, flip payload bits
                try:
                    while True:
                        prefix = await reader.readexactly(12)
                        hlen, plen = struct.unpack("<IQ", prefix)
                        header = await reader.readexactly(hlen)
                        payload = bytearray(await reader.readexactly(plen - 1)) if plen > 1 else bytearray()
                        if payload and rng.random() < 0.05:
                            payload[rng.randrange(len(payload))] ^= 1 << rng.randrange(8)
                            flipped[0] += 1
                        up_w.write(prefix + header + payload)
                        await up_w.drain()
                except (asyncio.IncompleteReadError, ConnectionError):
                    up_w.close()

            async def downstream() -> None:
                while data := await up_r.read(65536):
                    writer.write(data)
                    await writer.drain()
                writer.close()

            await asyncio.gather(upstream(), downstream(), return_exceptions=True)

        proxy = await asyncio.start_server(relay, "127.0.0.1", 0)
        try:  # not `async with proxy`: from Python 3.12 it waits for the relayed connections, which the channels hold
            peer = await sender.connect(f"127.0.0.1:{proxy.sockets[0].getsockname()[1]}")
            order = list(range(64))
            rng.shuffle(order)
            for i in range(3):
                result = await sender.transfer(TransferPlan.for_blocks(peer, SMALL, range(64), order, transfer_id=f"t{i}"))
                assert result.integrity.value == "verified"
            caught = receiver.statistics().checksum_failures
        finally:
            proxy.close()
    assert flipped[0] > 0 and caught == flipped[0], (flipped[0], caught)
    s = SMALL
    a = np.frombuffer(src.buffers[0], np.uint8).reshape(s.num_layers, s.kv_planes, 64, -1)
    b = np.frombuffer(dst.buffers[0], np.uint8).reshape(s.num_layers, s.kv_planes, 64, -1)
    assert np.array_equal(b[:, :, order], a)


@pytest.mark.parametrize("transport", ["tcp", "ucx"])
async def test_listening_beyond_loopback_requires_a_token(transport: str) -> None:
    """Default bind is 127.0.0.1; any other address without auth_token is refused naming the field and value."""
    async with KVTransferChannel(transport, KVTransportConfig(listen_host="0.0.0.0"), name="open") as channel:
        with pytest.raises(ConfigError, match=r"listen_host='0.0.0.0' is not a loopback address: set auth_token"):
            await channel.listen()
        with pytest.raises(ConfigError, match=r"listen address='0.0.0.0' is not a loopback"):
            await channel.listen("0.0.0.0:0")
    async with KVTransferChannel(transport, KVTransportConfig(), name="local") as channel:
        assert (await channel.listen()).startswith("127.0.0.1:")
    async with KVTransferChannel(transport, KVTransportConfig(listen_host="0.0.0.0", auth_token=TOKEN), name="t") as channel:
        assert (await channel.listen()).rsplit(":", 1)[1].isdigit()
