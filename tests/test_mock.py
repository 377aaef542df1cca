"""The mock transport's own model and hooks: link model, eager vs rendezvous, faults, stall, kill."""

from __future__ import annotations

import asyncio

import pytest

from sage_transport import ConnectionClosedError, PeerDeadError
from sage_transport.testing import mock_pair
from sage_transport.transports.mock import FaultAction, FaultRule, MockNetwork, MockTransport


async def test_bandwidth_model_paces_the_sender() -> None:
    async with mock_pair(bandwidth_Bps=10e6) as pair:
        loop = asyncio.get_running_loop()
        start = loop.time()
        reader = asyncio.create_task(pair.b.recv())
        await pair.a.send(b"h", bytes(500_000))
        await reader
        assert loop.time() - start >= 0.045  # 0.5 MB at 10 MB/s = 50 ms


async def test_latency_delays_delivery() -> None:
    async with mock_pair(latency_s=0.03) as pair:
        loop = asyncio.get_running_loop()
        start = loop.time()
        await pair.a.send(b"ping")
        await pair.b.recv()
        assert loop.time() - start >= 0.028


async def test_small_payloads_are_copied_at_send_time() -> None:
    async with mock_pair(eager_threshold=1024) as pair:
        data = bytearray(b"a" * 100)
        await pair.a.send(b"eager", data)  # returns before any receive
        data[:] = b"b" * 100
        frame = await pair.b.recv()
        assert bytes(frame.payload or b"") == b"a" * 100


async def test_large_payloads_wait_for_the_receiver() -> None:
    async with mock_pair(eager_threshold=1024) as pair:
        send = asyncio.create_task(pair.a.send(b"rndv", bytes(4096)))
        await asyncio.sleep(0.01)
        assert not send.done()
        await pair.b.recv()
        await asyncio.wait_for(send, 1)


@pytest.mark.parametrize("action", [FaultAction.DROP, FaultAction.DUPLICATE, FaultAction.CORRUPT])
async def test_fault_rules(action: FaultAction) -> None:
    async with mock_pair() as pair:
        rule = pair.a.network.faults.add(FaultRule(action, after=1, times=1))  # type: ignore[attr-defined]
        for i in range(3):
            await pair.a.send(b"%d" % i, bytes([i]) * 64)
        await pair.a.send(b"end")
        frames = []
        while True:
            frame = await pair.b.recv()
            if frame.header == b"end":
                break
            frames.append((frame.header, bytes(frame.payload or b"")))
        assert rule.fired == 1
        if action is FaultAction.DROP:
            assert [h for h, _ in frames] == [b"0", b"2"]
        elif action is FaultAction.DUPLICATE:
            assert [h for h, _ in frames] == [b"0", b"1", b"1", b"2"]
        else:
            assert frames[1][1] != bytes([1]) * 64 and sum(a != b for a, b in zip(frames[1][1], bytes([1]) * 64)) == 1
            assert frames[0][1] == bytes([0]) * 64 and frames[2][1] == bytes([2]) * 64


async def test_kill_rule_breaks_every_connection_of_the_endpoint() -> None:
    async with mock_pair() as pair:
        pair.a.network.faults.add(FaultRule(FaultAction.KILL, src=pair.a.local_address))  # type: ignore[attr-defined]
        with pytest.raises(PeerDeadError):
            await pair.a.send(b"x", b"payload")
        with pytest.raises(PeerDeadError):
            await pair.b.recv()


async def test_stall_holds_frames_until_resume() -> None:
    network = MockNetwork()
    server, client = MockTransport(network, name="s"), MockTransport(network, name="c")
    listener = await server.listen()
    a = await client.connect(listener.address)
    b = await listener.accept()
    network.stall("mock://s")
    await a.send(b"held")
    reader = asyncio.create_task(b.recv())
    await asyncio.sleep(0.03)
    assert not reader.done()
    network.resume("mock://s")
    assert (await asyncio.wait_for(reader, 1)).header == b"held"
    network.stall("mock://s", seconds=0.02)
    await a.send(b"timed")
    assert (await asyncio.wait_for(b.recv(), 1)).header == b"timed"
    await a.aclose()
    await b.aclose()
    await listener.aclose()


async def test_connect_to_nothing_and_closed_listener() -> None:
    transport = MockTransport()
    with pytest.raises(PeerDeadError, match="nothing listens"):
        await transport.connect("mock://nowhere")
    listener = await transport.listen()
    await listener.aclose()
    with pytest.raises(ConnectionClosedError):
        await listener.accept()
