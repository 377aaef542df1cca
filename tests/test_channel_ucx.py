"""The channel over UCX in one process (two workers): direct placement on one host, its fallback, and
many peers (one sender to several receivers, several senders to one receiver) fair by priority."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
from collections.abc import AsyncIterator

import numpy as np
import pytest

from sage_transport import KVCacheSchema, KVMemory, KVTransferChannel, KVTransportConfig, Priority, TransferPlan
from sage_transport.errors import TransportError

from .conftest import filled

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ucxx") is None, reason="ucxx is not installed")

SCHEMA = KVCacheSchema(num_layers=4, num_kv_heads=2, head_dim=64, block_size=16)  # 4 KiB pages


def pages(memory: KVMemory) -> np.ndarray:
    s = memory.schema
    return np.frombuffer(memory.buffers[0], np.uint8).reshape(s.num_layers, s.kv_planes, memory.num_blocks, -1)


@contextlib.asynccontextmanager
async def ucx_channels(count: int, config: KVTransportConfig) -> AsyncIterator[list[KVTransferChannel]]:
    async with contextlib.AsyncExitStack() as stack:
        channels = [await stack.enter_async_context(KVTransferChannel("ucx", config, name=f"node-{i}")) for i in range(count)]
        yield channels


@pytest.mark.parametrize(
    ("placement", "shared", "kind", "verify", "mapped"),
    [
        (True, False, "cma", "writer", True),
        (True, True, "shm", "writer", True),
        (True, True, "shm", "receiver", True),
        (True, True, "cma", "writer", False),  # map_peer_cache=false: the shared cache is written with CMA
        (False, True, "none", "writer", True),
    ],
)
async def test_same_host_transfer_places_chunks_directly(
    placement: bool, shared: bool, kind: str, verify: str, mapped: bool
) -> None:
    config = KVTransportConfig(chunk_size=64 << 10, direct_placement=placement, verify_placed=verify, map_peer_cache=mapped)
    blocks = 96
    src, dst = filled(SCHEMA, blocks), KVMemory.allocate(SCHEMA, blocks, fill=0, shared=shared)
    order = np.random.default_rng(3).permutation(blocks).tolist()
    async with ucx_channels(2, config) as (sender, receiver):
        sender.register(src)
        receiver.register(dst)
        peer = await sender.connect(await receiver.listen())
        assert sender.links()[peer]["same_host"] is True
        for i in range(2):  # the first transfer proves acceptance with two-sided chunks, then places
            plan = TransferPlan.for_blocks(peer, SCHEMA, range(blocks), order, transfer_id=f"t{i}")
            result = await sender.transfer(plan)
            assert result.integrity.value == "verified"
            assert (await receiver.wait_received(plan.transfer_id)).integrity.value == "verified"
        stats = sender.statistics()
        assert sender.links()[peer]["placement"] == kind
    assert np.array_equal(pages(dst)[:, :, order], pages(src))
    assert (stats.chunks_placed > 0) is placement
    assert stats.placement_failures == 0


async def test_a_placed_chunk_whose_landed_checksum_disagrees_goes_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer's own reading of where a chunk landed is what the receiver trusts (verify_placed=writer): a
    disagreement is a checksum failure, the chunk is written again, and only the good copy is acknowledged."""
    from sage_transport import placement

    real = placement.ShmWriter.write_checked
    bad = 0

    def flaky(self, *args):  # type: ignore[no-untyped-def]
        nonlocal bad
        source, landed = real(self, *args)
        if bad < 2:
            bad += 1
            return source, landed ^ 1
        return source, landed

    monkeypatch.setattr(placement.ShmWriter, "write_checked", flaky)
    config = KVTransportConfig(chunk_size=64 << 10)
    blocks = 96
    src, dst = filled(SCHEMA, blocks), KVMemory.allocate(SCHEMA, blocks, fill=0, shared=True)
    order = np.random.default_rng(5).permutation(blocks).tolist()
    async with ucx_channels(2, config) as (sender, receiver):
        sender.register(src)
        receiver.register(dst)
        peer = await sender.connect(await receiver.listen())
        for i in range(2):
            plan = TransferPlan.for_blocks(peer, SCHEMA, range(blocks), order, transfer_id=f"t{i}")
            assert (await sender.transfer(plan)).integrity.value == "verified"
        assert sender.statistics().chunks_placed > 0
        assert receiver.statistics().checksum_failures == bad == 2
    assert np.array_equal(pages(dst)[:, :, order], pages(src))


async def test_failed_placement_falls_back_to_sending_and_loses_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    from sage_transport import placement as cma

    calls = 0

    def broken(self, *args):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        raise TransportError("injected: process_vm_writev failed")

    monkeypatch.setattr(cma.CmaWriter, "write", broken)
    config = KVTransportConfig(chunk_size=64 << 10)
    blocks = 96
    src, dst = filled(SCHEMA, blocks), KVMemory.allocate(SCHEMA, blocks, fill=0)
    order = np.random.default_rng(4).permutation(blocks).tolist()
    async with ucx_channels(2, config) as (sender, receiver):
        sender.register(src)
        receiver.register(dst)
        peer = await sender.connect(await receiver.listen())
        plan = TransferPlan.for_blocks(peer, SCHEMA, range(blocks), order, transfer_id="t")
        result = await sender.transfer(plan)
        stats = sender.statistics()
    assert result.integrity.value == "verified" and calls >= 1
    assert stats.placement_failures >= 1 and stats.chunks_placed == 0
    assert np.array_equal(pages(dst)[:, :, order], pages(src))


async def test_one_sender_to_three_receivers_and_three_senders_to_one() -> None:
    config = KVTransportConfig(chunk_size=32 << 10, peer_window=4)
    blocks = 64
    async with ucx_channels(4, config) as channels:
        hub, others = channels[0], channels[1:]
        # fan-out: hub sends its cache to each of the others
        src = filled(SCHEMA, blocks, seed=7)
        hub.register(src)
        dsts = [KVMemory.allocate(SCHEMA, blocks, fill=0) for _ in others]
        peers = []
        for channel, dst in zip(others, dsts):
            channel.register(dst)
            peers.append(await hub.connect(await channel.listen()))
        orders = [np.random.default_rng(i).permutation(blocks).tolist() for i in range(len(others))]
        plans = [
            TransferPlan.for_blocks(peer, SCHEMA, range(blocks), order, transfer_id=f"out-{i}")
            for i, (peer, order) in enumerate(zip(peers, orders))
        ]
        results = await asyncio.gather(*(hub.transfer(plan) for plan in plans))
        assert all(r.integrity.value == "verified" for r in results)
        for dst, order in zip(dsts, orders):
            assert np.array_equal(pages(dst)[:, :, order], pages(src))


async def test_fan_out_priority_overtakes_across_receivers() -> None:
    """One sender, bulk migrations to two receivers under way: a decode-critical transfer to a third receiver
    started later still finishes first (the scheduler's priority queues span every peer)."""
    config = KVTransportConfig(chunk_size=16 << 10, peer_window=2, direct_placement=False)
    blocks = 512
    async with ucx_channels(4, config) as channels:
        hub, others = channels[0], channels[1:]
        hub.register(filled(SCHEMA, blocks, seed=8))
        peers = []
        for channel in others:
            channel.register(KVMemory.allocate(SCHEMA, blocks, fill=0))
            peers.append(await hub.connect(await channel.listen()))
        finished: list[str] = []

        async def send(i: int, priority: Priority, count: int) -> None:
            plan = TransferPlan.for_blocks(peers[i], SCHEMA, range(count), range(count), transfer_id=f"t{i}", priority=priority)
            handle = hub.submit(plan)
            await handle.wait()
            finished.append(plan.transfer_id)

        bulk = [asyncio.create_task(send(i, Priority.BULK, blocks)) for i in (0, 1)]
        await asyncio.sleep(0.01)
        await send(2, Priority.DECODE_CRITICAL, 8)
        await asyncio.gather(*bulk)
    assert finished[0] == "t2", finished


async def test_fan_in_shares_the_receiver() -> None:
    """Three senders into one receiver at once: all land intact, and none waits for another to finish
    (when the first completes, the others are well under way)."""
    config = KVTransportConfig(chunk_size=16 << 10, peer_window=4)
    blocks = 256
    async with ucx_channels(4, config) as channels:
        sink, senders = channels[0], channels[1:]
        sink_memory = KVMemory.allocate(SCHEMA, blocks * 3, fill=0)
        sink.register(sink_memory)
        address = await sink.listen()
        sources = [filled(SCHEMA, blocks, seed=10 + i) for i in range(3)]
        peers = []
        for channel, memory in zip(senders, sources):
            channel.register(memory)
            peers.append(await channel.connect(address))
        handles = [
            channel.submit(
                TransferPlan.for_blocks(peer, SCHEMA, range(blocks), range(i * blocks, (i + 1) * blocks), transfer_id=f"in-{i}")
            )
            for i, (channel, peer) in enumerate(zip(senders, peers))
        ]
        await asyncio.wait([asyncio.ensure_future(h.wait()) for h in handles], return_when=asyncio.FIRST_COMPLETED)
        shares = sorted(h.progress().bytes_verified / h.progress().bytes for h in handles)
        await asyncio.gather(*(h.wait() for h in handles))
        for i, memory in enumerate(sources):
            assert np.array_equal(pages(sink_memory)[:, :, i * blocks : (i + 1) * blocks], pages(memory))
    assert shares[-1] == 1.0 and shares[0] > 0.25, shares


async def test_tcp_backend_places_chunks_directly_on_one_host() -> None:
    """The TCP transport also knows a loopback peer is on this host, so bulk KV never crosses TCP there."""
    config = KVTransportConfig(backend="tcp", chunk_size=64 << 10)
    blocks = 64
    src, dst = filled(SCHEMA, blocks), KVMemory.allocate(SCHEMA, blocks, fill=0, shared=True)
    async with KVTransferChannel("tcp", config, name="a") as sender, KVTransferChannel("tcp", config, name="b") as receiver:
        sender.register(src)
        receiver.register(dst)
        peer = await sender.connect(await receiver.listen())
        assert sender.links()[peer]["same_host"] is True
        for i in range(2):
            plan = TransferPlan.for_blocks(peer, SCHEMA, range(blocks), range(blocks), transfer_id=f"t{i}")
            await sender.transfer(plan)
        assert sender.links()[peer]["placement"] == "shm"
        assert sender.statistics().chunks_placed > 0
    assert np.array_equal(pages(dst), pages(src))
