"""KVTransferChannel end to end over the mock transport: data, layouts, priorities, layers, faults, security."""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np
import pytest
import torch

from sage_transport import (
    AuthError,
    ChecksumError,
    IntegrityStatus,
    KVCacheSchema,
    KVMemory,
    KVTransferChannel,
    KVTransportConfig,
    Layout,
    PeerDeadError,
    PlanError,
    Priority,
    TransferAbortedError,
    TransferPlan,
    TransferTimeoutError,
    UnsupportedError,
)
from sage_transport.transports.mock import FaultAction, FaultRule, MockNetwork, MockTransport
from sage_transport.wire import Chunk, decode_message

from .conftest import SMALL, Pair, assert_idle, channel_pair, filled, shuffled


def assert_moved(pair: Pair, dst_blocks: list[int], src_blocks: list[int] | None = None) -> None:
    src_blocks = src_blocks if src_blocks is not None else list(range(len(dst_blocks)))
    assert np.array_equal(pair.dst_pages()[:, :, dst_blocks], pair.src_pages()[:, :, src_blocks])


@pytest.mark.parametrize("chunk_size", [512, 1024, 4096, 1 << 20])
@pytest.mark.parametrize("gather", [True, False])
async def test_shuffled_transfer_is_byte_identical_and_verified(chunk_size: int, gather: bool) -> None:
    config = KVTransportConfig(chunk_size=chunk_size, gather=gather, peer_window=3)
    async with channel_pair(config=config) as pair:
        dst = shuffled(64)
        plan = TransferPlan.for_blocks(pair.peer, SMALL, range(64), dst)
        waiter = asyncio.ensure_future(pair.receiver.wait_received(plan.transfer_id))
        result = await pair.sender.transfer(plan)
        received = await waiter
        assert result.bytes == received.bytes == plan.total_bytes
        assert result.chunks == received.chunks >= plan.total_bytes // chunk_size
        assert result.integrity is received.integrity is IntegrityStatus.VERIFIED
        assert set(result.phases) == {"plan_s", "queue_s", "transfer_s"}
        assert_moved(pair, dst)
        assert_idle(pair.sender, pair.receiver)
        assert await pair.receiver.wait_received(plan.transfer_id) == received  # late waiters get the result


async def test_a_handle_describes_each_chunk_as_the_planner_cut_it() -> None:
    async with channel_pair(config=KVTransportConfig(chunk_size=4096)) as pair:
        dst = shuffled(16)
        handle = pair.sender.submit(TransferPlan.for_blocks(pair.peer, SMALL, range(16), dst, priority=Priority.BULK))
        chunks = [handle.chunk(seq) for seq in range(handle.progress().chunks)]
        await handle.wait()
    assert [c.seq for c in chunks] == list(range(len(chunks))) and all(c.transfer_id == handle.transfer_id for c in chunks)
    assert sum(c.nbytes for c in chunks) == handle.plan.total_bytes
    assert [c.offset for c in chunks] == [sum(c.nbytes for c in chunks[:i]) for i in range(len(chunks))]
    for c in chunks:  # the runs cover the chunk on both sides, within its layers
        assert sum(n for _, _, n in c.src_runs) == sum(n for _, _, n in c.dst_runs) == c.nbytes <= 4096
        assert 0 <= c.layer_start < c.layer_stop <= SMALL.num_layers and c.priority is Priority.BULK
    assert chunks[0].wire_dtype == SMALL.dtype
    with pytest.raises(IndexError, match=f"chunk {len(chunks)} out of range"):
        handle.chunk(len(chunks))


async def test_a_one_chunk_transfer_behind_a_more_urgent_one_still_goes_in_priority_order() -> None:
    """A one-chunk transfer's frame (its announcement and chunk together) waits its turn like any chunk: a more
    urgent transfer queued before it goes first, and both complete."""
    async with channel_pair(config=KVTransportConfig(chunk_size=2048, peer_window=2)) as pair:  # a block: one chunk
        done: list[str] = []
        urgent = pair.sender.submit(
            TransferPlan.for_blocks(
                pair.peer, SMALL, range(16), range(16), priority=Priority.DECODE_CRITICAL, transfer_id="urgent"
            )
        )
        urgent._out.future.add_done_callback(lambda _: done.append("urgent"))
        small = await pair.sender.transfer(TransferPlan.for_blocks(pair.peer, SMALL, [20], [40], transfer_id="small"))
        done.append("small")
        assert small.chunks == 1 and (await urgent.wait()).chunks > 1
        assert done == ["urgent", "small"]
        assert_moved(pair, [40], [20])
        assert_idle(pair.sender, pair.receiver)


async def test_sides_may_use_different_layouts_and_buffer_splits() -> None:
    network = MockNetwork()
    src_schema = KVCacheSchema(num_layers=3, num_kv_heads=2, head_dim=8, block_size=2, layout="block_layer_kv")
    dst_schema = KVCacheSchema(num_layers=3, num_kv_heads=2, head_dim=8, block_size=2, layout="layer_block_kv")
    blocks, page = 10, src_schema.page_bytes
    src = filled(src_schema, blocks)
    per_layer = [torch.zeros(blocks, 2, page // 2, dtype=torch.bfloat16) for _ in range(3)]  # vLLM/FlashInfer style
    async with (
        KVTransferChannel(MockTransport(network, name="d"), name="d") as rx,
        KVTransferChannel(MockTransport(network, name="p"), name="p") as tx,
    ):
        rx.register(KVMemory(dst_schema, blocks, per_layer))
        tx.register(src)
        peer = await tx.connect(await rx.listen())
        dst = shuffled(blocks, 3)
        await tx.transfer(TransferPlan.for_blocks(peer, src_schema, range(blocks), dst))
    src_pages = np.frombuffer(src.buffers[0], np.uint8).reshape(blocks, 3, 2, page)  # block, layer, plane
    for layer in range(3):
        got = per_layer[layer].view(torch.uint8).numpy().reshape(blocks, 2, page)  # block, plane
        assert np.array_equal(got[dst], src_pages[:, layer])


async def test_partial_layers_and_block_subsets() -> None:
    async with channel_pair() as pair:
        plan = TransferPlan.for_blocks(pair.peer, SMALL, [5, 9, 10, 11], [40, 2, 3, 4], layers=(1, 3))
        await pair.sender.transfer(plan)
        dst, src = pair.dst_pages(), pair.src_pages()
        assert np.array_equal(dst[1:3][:, :, [40, 2, 3, 4]], src[1:3][:, :, [5, 9, 10, 11]])
        assert not dst[0].any() and not dst[3].any()
        assert dst[1:3].astype(bool).sum() == src[1:3][:, :, [5, 9, 10, 11]].astype(bool).sum()


async def test_progressive_layers_go_when_ready_and_arrive_in_order() -> None:
    async with channel_pair() as pair:
        plan = TransferPlan.for_blocks(pair.peer, SMALL, range(16), shuffled(16), progressive=True)
        handle = pair.sender.submit(plan)
        arrivals: list[int] = []

        async def watch() -> None:
            async for arrival in pair.receiver.arrivals(plan.transfer_id):
                arrivals.append(arrival.layer)

        watcher = asyncio.create_task(watch())
        await asyncio.sleep(0.05)
        assert handle.progress().chunks_verified == 0 and pair.sender.statistics().chunks_sent == 0
        for layer in (0, 1):
            handle.mark_layer_ready(layer)
            await pair.receiver.wait_layer(plan.transfer_id, layer)
        assert arrivals == [0, 1] and not handle.done()
        pair.sender.mark_layer_ready(plan.transfer_id, [3, 2])
        result = await handle.wait()
        await watcher
        assert arrivals == [0, 1, 2, 3]
        assert result.chunks == handle.progress().chunks_verified
        assert_moved(pair, plan.mappings[0].dst_blocks, list(range(16)))  # type: ignore[arg-type]


async def test_decode_critical_overtakes_a_bulk_migration() -> None:
    config = KVTransportConfig(chunk_size=1024, peer_window=2)
    async with channel_pair(blocks=256, config=config, bandwidth_Bps=20e6) as pair:
        bulk = pair.sender.submit(TransferPlan.for_blocks(pair.peer, SMALL, range(200), range(200), priority=Priority.BULK))
        while bulk.progress().chunks_verified < 10:
            await asyncio.sleep(0.002)
        before = bulk.progress().chunks_verified
        critical = TransferPlan.for_blocks(pair.peer, SMALL, range(200, 208), range(200, 208), priority="decode_critical")
        result = await pair.sender.transfer(critical)
        overtaken_by = bulk.progress().chunks_verified - before
        assert not bulk.done(), "the critical transfer waited for the bulk one"
        assert overtaken_by <= config.peer_window + 1, f"{overtaken_by} bulk chunks went ahead of the critical ones"
        assert result.chunks > 0
        await bulk.wait()


async def test_deadline_aborts_both_sides_and_releases_everything() -> None:
    async with channel_pair(bandwidth_Bps=2e5) as pair:
        plan = TransferPlan.for_blocks(pair.peer, SMALL, range(64), range(64), deadline_s=0.1)
        waiter = asyncio.ensure_future(pair.receiver.wait_received(plan.transfer_id))
        with pytest.raises(TransferTimeoutError, match=rf"transfer {plan.transfer_id} to decode missed its 0.1s deadline"):
            await pair.sender.transfer(plan)
        with pytest.raises(TransferAbortedError, match="deadline"):
            await asyncio.wait_for(waiter, 5)
        assert_idle(pair.sender, pair.receiver)


async def test_cancelling_the_caller_aborts_the_transfer_at_the_peer() -> None:
    async with channel_pair(bandwidth_Bps=2e5) as pair:
        plan = TransferPlan.for_blocks(pair.peer, SMALL, range(64), range(64))
        waiter = asyncio.ensure_future(pair.receiver.wait_received(plan.transfer_id))
        task = asyncio.create_task(pair.sender.transfer(plan))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        with pytest.raises(TransferAbortedError, match="cancelled"):
            await asyncio.wait_for(waiter, 5)
        assert_idle(pair.sender, pair.receiver)


async def test_receiver_can_cancel_and_the_sender_is_told() -> None:
    async with channel_pair(bandwidth_Bps=2e5) as pair:
        plan = TransferPlan.for_blocks(pair.peer, SMALL, range(64), range(64))
        handle = pair.sender.submit(plan)
        while pair.receiver.statistics().transfers_receiving == 0:
            await asyncio.sleep(0.005)
        assert pair.receiver.cancel(plan.transfer_id, "decode instance is draining")
        with pytest.raises(TransferAbortedError, match="draining"):
            await asyncio.wait_for(handle.wait(), 5)
        assert_idle(pair.sender, pair.receiver)


async def test_corrupted_chunks_are_detected_and_resent() -> None:
    async with channel_pair() as pair:
        rule = pair.network.faults.add(FaultRule(FaultAction.CORRUPT, src="mock://prefill", after=3, times=2))
        dst = shuffled(64)
        result = await pair.sender.transfer(TransferPlan.for_blocks(pair.peer, SMALL, range(64), dst))
        assert rule.fired == 2
        assert result.retries == 2
        assert pair.receiver.statistics().checksum_failures == 2
        assert_moved(pair, dst)


async def test_persistent_corruption_fails_naming_the_chunk() -> None:
    config = KVTransportConfig(chunk_size=1024, max_retries=2)
    async with channel_pair(config=config) as pair:
        pair.network.faults.add(FaultRule(FaultAction.CORRUPT, src="mock://prefill", times=None))
        plan = TransferPlan.for_blocks(pair.peer, SMALL, range(8), range(8))
        waiter = asyncio.ensure_future(pair.receiver.wait_received(plan.transfer_id))
        with pytest.raises(
            ChecksumError, match=rf"chunk \d+ of transfer {plan.transfer_id} to decode failed its checksum 3 times"
        ):
            await pair.sender.transfer(plan)
        with pytest.raises(TransferAbortedError):
            await asyncio.wait_for(waiter, 5)
        assert_idle(pair.sender, pair.receiver)


async def test_lost_and_duplicated_chunks_are_absorbed() -> None:
    config = KVTransportConfig(chunk_size=1024, peer_window=4, ack_timeout_s=0.1)
    async with channel_pair(config=config, seed=7) as pair:
        pair.network.faults.add(FaultRule(FaultAction.DROP, src="mock://prefill", after=5, times=3))
        pair.network.faults.add(FaultRule(FaultAction.DUPLICATE, src="mock://prefill", times=None, probability=0.3))
        pair.network.faults.add(FaultRule(FaultAction.DELAY, src="mock://prefill", times=5, delay_s=0.01, probability=0.5))
        dst = shuffled(64, 5)
        await asyncio.wait_for(pair.sender.transfer(TransferPlan.for_blocks(pair.peer, SMALL, range(64), dst)), 20)
        assert pair.receiver.statistics().duplicates > 0
        assert pair.sender.statistics().retries >= 3
        assert_moved(pair, dst)
        assert_idle(pair.sender, pair.receiver)


def _chunk_header(seq: int, attempt: int):  # type: ignore[no-untyped-def]
    def match(header: bytes) -> bool:
        msg = decode_message(header)
        return isinstance(msg, Chunk) and msg.seq == seq and msg.attempt == attempt

    return match


async def test_a_stale_nack_about_a_superseded_attempt_is_ignored() -> None:
    """Promise 4, stale epoch: chunk 5's first copy is corrupted *and* late, so the sender has already resent it
    (ack timeout) when the receiver's NACK for that first copy arrives. Acting on it would free the window slot
    of the copy still in flight and count a retry twice; it is ignored, the second copy is acknowledged and the
    transfer arrives byte-identical with the window never exceeded."""
    config = KVTransportConfig(chunk_size=1024, peer_window=4, ack_timeout_s=0.05, max_retries=1)
    async with channel_pair(config=config, seed=3) as pair:
        late_and_bad = _chunk_header(5, 0)
        pair.network.faults.add(FaultRule(FaultAction.CORRUPT, src="mock://prefill", match=late_and_bad))
        pair.network.faults.add(FaultRule(FaultAction.DELAY, src="mock://prefill", match=late_and_bad, delay_s=0.2))
        dst = shuffled(64, 11)
        handle = pair.sender.submit(TransferPlan.for_blocks(pair.peer, SMALL, range(64), dst))
        peak = 0
        while not handle.done():
            peak = max(peak, pair.sender.statistics().inflight_chunks)
            await asyncio.sleep(0.002)
        await handle.wait()  # max_retries=1: counting the stale NACK as a second failure would have failed it
        stats = pair.sender.statistics()
        assert stats.stale_messages >= 1 and pair.receiver.statistics().checksum_failures == 1
        assert peak <= config.peer_window
        assert_moved(pair, dst)
        assert_idle(pair.sender, pair.receiver)


async def test_reordered_and_duplicated_chunks_of_every_attempt_lose_no_byte() -> None:
    """Promise 4: chunks arrive out of order (random delays), twice (duplicates) and from superseded attempts
    (resends after short ack timeouts race their originals): all absorbed, none accepted twice, no byte lost."""
    # late acks make many copies of a chunk, each may be corrupted: allow more bad copies than the default
    config = KVTransportConfig(chunk_size=512, peer_window=8, ack_timeout_s=0.02, max_retries=10)
    async with channel_pair(config=config, seed=5) as pair:
        faults = pair.network.faults
        faults.add(FaultRule(FaultAction.DELAY, src="mock://prefill", times=None, probability=0.2, delay_s=0.03))
        faults.add(FaultRule(FaultAction.DUPLICATE, src="mock://prefill", times=None, probability=0.2))
        faults.add(FaultRule(FaultAction.CORRUPT, src="mock://prefill", times=None, probability=0.05))
        dst = shuffled(64, 2)
        await asyncio.wait_for(pair.sender.transfer(TransferPlan.for_blocks(pair.peer, SMALL, range(64), dst)), 30)
        received = pair.receiver.statistics()
        assert received.duplicates > 0 and received.checksum_failures > 0
        assert_moved(pair, dst)
        assert_idle(pair.sender, pair.receiver)


async def test_peer_death_fails_the_transfer_naming_peer_and_transfer() -> None:
    async with channel_pair(bandwidth_Bps=1e6) as pair:
        plan = TransferPlan.for_blocks(pair.peer, SMALL, range(64), range(64))
        handle = pair.sender.submit(plan)
        while handle.progress().chunks_verified < 2:
            await asyncio.sleep(0.002)
        loop = asyncio.get_running_loop()
        killed_at = loop.time()
        pair.network.kill("mock://decode")
        with pytest.raises(PeerDeadError, match=rf"transfer {plan.transfer_id} to decode failed after \d+/\d+ verified chunks"):
            await handle.wait()
        assert loop.time() - killed_at < 0.05
        assert pair.sender.peers == []
        assert_idle(pair.sender)


async def test_both_directions_at_once() -> None:
    async with channel_pair() as pair:
        back = shuffled(64, 9)
        forth = shuffled(64, 8)
        await asyncio.gather(
            pair.sender.transfer(TransferPlan.for_blocks(pair.peer, SMALL, range(64), forth)),
            pair.receiver.transfer(TransferPlan.for_blocks("prefill", SMALL, range(64), back)),
        )
        assert pair.receiver.statistics().bytes_received == pair.sender.statistics().bytes_received == 64 * SMALL.bytes_per_block


async def test_unchecked_integrity_is_reported() -> None:
    async with channel_pair(config=KVTransportConfig(integrity="none")) as pair:  # type: ignore[arg-type]
        result = await pair.sender.transfer(TransferPlan.for_blocks(pair.peer, SMALL, range(4), range(4)))
        assert result.integrity is IntegrityStatus.UNCHECKED


async def test_bad_plans_are_refused_at_submit_with_names() -> None:
    async with channel_pair(blocks=8) as pair:
        with pytest.raises(PlanError, match="peer 'nobody' is not connected"):
            pair.sender.submit(TransferPlan.for_blocks("nobody", SMALL, [0], [0]))
        with pytest.raises(PlanError, match="dst block 8 is out of range"):
            pair.sender.submit(TransferPlan.for_blocks(pair.peer, SMALL, [0], [8]))
        other = KVCacheSchema(num_layers=4, num_kv_heads=2, head_dim=32, block_size=4)
        with pytest.raises(PlanError, match="does not match the local KV memory"):
            pair.sender.submit(TransferPlan.for_blocks(pair.peer, other, [0], [0]))
        with pytest.raises(UnsupportedError, match="target_dtype=fp16 is neither the stored bf16 nor a quantised"):
            pair.sender.submit(TransferPlan.for_blocks(pair.peer, SMALL, [0], [0], target_dtype="fp16"))
        handle = pair.sender.submit(TransferPlan.for_blocks(pair.peer, SMALL, [0], [0], transfer_id="same"))
        with pytest.raises(PlanError, match="transfer same is already in progress"):
            pair.sender.submit(TransferPlan.for_blocks(pair.peer, SMALL, [1], [1], transfer_id="same"))
        await handle.wait()


async def test_abandoned_waits_leak_nothing() -> None:
    async with channel_pair() as pair:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.02):
                await pair.receiver.wait_received("never-sent")
        assert pair.receiver._expect == {}


@pytest.mark.parametrize(
    ("server_token", "client_token", "message"),
    [
        ("shared-secret-1-7fQ2xK9mZ4pW8rT3", "shared-secret-2-Lb5nV1cJ6hY0sD4g", "failed the token challenge|did not prove"),
        ("shared-secret-1-7fQ2xK9mZ4pW8rT3", None, "requires a token"),
        (None, "shared-secret-1-7fQ2xK9mZ4pW8rT3", "did not prove"),
    ],
)
async def test_handshake_refuses_peers_without_the_token(
    server_token: str | None, client_token: str | None, message: str
) -> None:
    network = MockNetwork()
    async with (
        KVTransferChannel(MockTransport(network, name="s"), KVTransportConfig(auth_token=server_token), name="s") as server,
        KVTransferChannel(MockTransport(network, name="c"), KVTransportConfig(auth_token=client_token), name="c") as client,
    ):
        address = await server.listen()
        with pytest.raises(AuthError, match=message):
            await client.connect(address)
        await asyncio.sleep(0.01)
        assert server.peers == [] and client.peers == []


async def test_matching_tokens_connect() -> None:
    config = KVTransportConfig(auth_token="shared-secret-1-7fQ2xK9mZ4pW8rT3")
    async with channel_pair(config=config) as pair:
        await pair.sender.transfer(TransferPlan.for_blocks(pair.peer, SMALL, [1], [2]))
        assert pair.receiver.peers == ["prefill"]


async def test_cuda_memory_where_torch_sees_no_gpu_is_refused_at_registration() -> None:
    class FakeCuda:  # a CUDA tensor's shape of things, on a machine without CUDA
        is_cuda = True
        device = "cuda:0"

        def is_contiguous(self) -> bool:
            return True

        def numel(self) -> int:
            return SMALL.num_layers * 2 * 4 * SMALL.page_bytes

        def element_size(self) -> int:
            return 1

    memory = KVMemory(SMALL, 4, FakeCuda())
    assert memory.kind == "cuda" and memory.device == "cuda:0"
    async with KVTransferChannel(MockTransport(), name="x") as channel:  # any transport moves device KV (staged)
        if not torch.cuda.is_available():
            with pytest.raises(UnsupportedError, match="torch sees no CUDA device"):
                channel.register(memory)


async def test_unopened_channel_refuses_work() -> None:
    channel = KVTransferChannel(MockTransport(), name="x")
    from sage_transport import ConnectionClosedError

    with pytest.raises(ConnectionClosedError, match="not open"):
        await channel.listen()
    await channel.aclose()


def test_layouts_round_trip_registration_sizes() -> None:
    schema = KVCacheSchema(num_layers=2, num_kv_heads=1, head_dim=8, layout=Layout.KV_LAYER_BLOCK)
    k_cache, v_cache = bytearray(2 * 4 * schema.page_bytes), bytearray(2 * 4 * schema.page_bytes)
    memory = KVMemory(schema, 4, [k_cache, v_cache])
    assert memory.geometry.split_axes == 1 and memory.nbytes == len(k_cache) * 2
    from sage_transport import ConfigError

    with pytest.raises(ConfigError, match="buffer 0 holds 10 bytes"):
        KVMemory(schema, 4, bytearray(10))
    with pytest.raises(ConfigError, match="3 buffers do not match layout kv_layer_block"):
        KVMemory(schema, 4, [k_cache, v_cache, v_cache])


async def test_closing_channels_leaves_no_task_behind() -> None:
    before = asyncio.all_tasks()
    async with channel_pair(bandwidth_Bps=1e6) as pair:
        handle = pair.sender.submit(TransferPlan.for_blocks(pair.peer, SMALL, range(64), range(64)))
        waiter = asyncio.ensure_future(pair.receiver.wait_received(handle.transfer_id))
        await asyncio.sleep(0.01)
        assert len(asyncio.all_tasks() - before) >= 5  # accept loop, 2 sessions x (reader, writer), waiter
    from sage_transport import TransportError

    with pytest.raises(TransportError):
        await handle.wait()
    with pytest.raises(TransportError):
        await waiter
    await asyncio.sleep(0)
    assert asyncio.all_tasks() - before == set()
    assert pair.network.connections() == []


async def test_receiver_enforces_the_deadline_when_the_sender_goes_silent() -> None:
    async with channel_pair() as pair:
        pair.network.faults.add(FaultRule(FaultAction.DROP, src="mock://prefill", times=None))  # every chunk vanishes
        is_abort = lambda header: header[1:3] == b"\xa1x"  # noqa: E731 - msgpack: array, then the tag "x"
        pair.network.faults.add(FaultRule(FaultAction.DROP, src="mock://prefill", times=None, payload_only=False, match=is_abort))
        plan = TransferPlan.for_blocks(pair.peer, SMALL, range(8), range(8), deadline_s=0.2)
        waiter = asyncio.ensure_future(pair.receiver.wait_received(plan.transfer_id))
        with pytest.raises(TransferTimeoutError):
            await pair.sender.transfer(plan)
        with pytest.raises(TransferTimeoutError, match=rf"transfer {plan.transfer_id} from prefill missed its 0.2s deadline"):
            await asyncio.wait_for(waiter, 5)
        assert_idle(pair.receiver)


@pytest.mark.parametrize("zero_copy", [True, False])
async def test_without_zero_copy_unverified_bytes_never_reach_the_cache(zero_copy: bool) -> None:
    config = KVTransportConfig(chunk_size=1024, max_retries=0, zero_copy=zero_copy)
    async with channel_pair(config=config) as pair:
        pair.network.faults.add(FaultRule(FaultAction.CORRUPT, src="mock://prefill", times=None))
        with pytest.raises(ChecksumError):
            await pair.sender.transfer(TransferPlan.for_blocks(pair.peer, SMALL, range(8), range(8)))
        touched = bool(pair.dst_pages().any())
        assert touched is zero_copy  # zero-copy lands in place before the check; staging never does


async def test_hostile_peer_gets_refusals_and_a_closed_connection_never_a_crash() -> None:
    from sage_transport.memory import KVGeometry
    from sage_transport.testing.adversary import Adversary
    from sage_transport.wire import Abort, Announce, BlockMapping, Chunk, decode_message, encode_message

    network = MockNetwork()
    async with KVTransferChannel(MockTransport(network, name="victim"), name="victim") as victim:
        memory = KVMemory.allocate(SMALL, 8, fill=0)
        victim.register(memory)
        address = await victim.listen()
        evil = Adversary(MockTransport(network, name="evil"), address, name="evil")
        await evil.open()
        conn = evil.conn
        assert conn is not None

        def announce(wire_id: int, mapping: BlockMapping, num_chunks: int = 1) -> bytes:
            return encode_message(
                Announce(
                    wire_id=wire_id, transfer_id=f"t{wire_id}", schema=SMALL, src_geometry=KVGeometry(Layout.LAYER_KV_BLOCK, 8),
                    mappings=[mapping], chunk_size=1024, gather=True, progressive=False, priority=1, deadline_s=None,
                    integrity="xxh3", num_chunks=num_chunks, total_bytes=0, digest=0, ack_every=1,
                )
            )  # fmt: skip

        await conn.send(announce(1, BlockMapping(0, 9, (0,), (0,))))  # layers beyond the schema
        await conn.send(announce(2, BlockMapping(0, 1, (0,), (99,))))  # destination block out of range
        await conn.send(announce(3, BlockMapping(0, 1, (0,), (1,)), num_chunks=5))  # table does not match ours
        reasons = []
        for _ in range(3):
            msg = decode_message((await asyncio.wait_for(conn.recv(), 2)).header)
            assert isinstance(msg, Abort) and not msg.from_sender
            reasons.append(msg.reason)
        assert "num_layers=4" in reasons[0] and "dst block 99" in reasons[1] and "chunk tables differ" in reasons[2]
        await conn.send(encode_message(Chunk(77, 0, 0, 0)), b"x" * 256)  # a chunk it never announced: dropped
        from sage_transport import TransportError

        with pytest.raises(TransportError):
            await asyncio.wait_for(conn.recv(), 2)
        assert victim.peers == []
        assert not np.frombuffer(memory.buffers[0], np.uint8).any(), "a hostile frame reached the KV cache"
        stats = victim.statistics()
        assert stats.transfers_receiving == 0 and stats.bytes_received == 0
        assert stats.transfers_refused == 3 and stats.protocol_errors == 1 and stats.internal_errors == 0


@pytest.mark.parametrize("streams", [1, 3])
async def test_several_chunks_in_flight_per_peer(streams: int) -> None:
    """The writer keeps up to ``send_lanes`` chunk sends in flight on one connection."""
    # 16 KiB chunks: above the mock's eager threshold, so a send lasts until the receiver takes the chunk
    config = KVTransportConfig(chunk_size=16 << 10, peer_window=16, send_lanes=streams, gather=True)
    async with channel_pair(config=config, latency_s=0.002) as pair:
        session = pair.sender._sessions[pair.peer]
        conn = session.conn
        original = conn.send
        state = {"now": 0, "max": 0}

        async def counting(header, payload=None):  # type: ignore[no-untyped-def]
            if payload is None:
                return await original(header, payload)
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
            try:
                return await original(header, payload)
            finally:
                state["now"] -= 1

        conn.send = counting  # type: ignore[method-assign]
        dst = shuffled(64)
        await pair.sender.transfer(TransferPlan.for_blocks(pair.peer, SMALL, range(64), dst))
        assert_moved(pair, dst)
    assert state["max"] == streams


@pytest.mark.parametrize("transport", ["tcp", "ucx"])
async def test_two_connected_channels_of_one_process_close_whichever_closes_first(transport: str) -> None:
    """The listening side closes while the peer it accepted is still connected (Python 3.12's Server.wait_closed
    waits for accepted connections: a listener that waited for it hung until the other channel closed)."""
    if transport == "ucx":
        pytest.importorskip("ucxx")
    for listener_first in (True, False):
        async with asyncio.timeout(20):
            dialer, listener = KVTransferChannel(transport, name="dialer"), KVTransferChannel(transport, name="listener")
            async with dialer, listener:
                dialer.register(filled(SMALL, 8, 1))
                listener.register(filled(SMALL, 8, 2))
                peer = await dialer.connect(await listener.listen())
                await dialer.transfer(TransferPlan.for_blocks(peer, SMALL, range(8), range(8)))
                await (listener if listener_first else dialer).aclose()
            assert not dialer.links() and not listener.links()


@pytest.mark.parametrize("arbitrate", [True, False])
async def test_a_decode_critical_transfer_from_one_sender_makes_the_others_hold_their_bulk(arbitrate: bool) -> None:
    """Three bulk senders and one decode-critical sender share the receiver's link (the mock's ``ingress_Bps``).
    With fan-in priority the receiver tells the bulk senders to hold while the critical transfer comes in: it
    ends first and the bulk ones get a release; without it, the bulk senders never hear a thing."""
    network = MockNetwork(ingress_Bps=100e6)  # the bulk transfers take the link ~60 ms: the critical one lands inside
    blocks = 1024
    config = KVTransportConfig(chunk_size=16 << 10, peer_window=4)
    receiver_config = KVTransportConfig(chunk_size=16 << 10, peer_window=4, fan_in_priority=arbitrate)
    dst = KVMemory.allocate(SMALL, blocks * 4, fill=0)
    async with contextlib.AsyncExitStack() as stack:
        receiver = await stack.enter_async_context(
            KVTransferChannel(MockTransport(network, name="decode"), receiver_config, name="decode")
        )
        receiver.register(dst)
        address = await receiver.listen()
        senders = []
        for i in range(4):
            sender = await stack.enter_async_context(
                KVTransferChannel(MockTransport(network, name=f"p{i}"), config, name=f"p{i}")
            )
            sender.register(filled(SMALL, blocks, seed=i))
            senders.append((sender, await sender.connect(address)))
        done: list[str] = []

        async def send(i: int, block_count: int, priority: Priority) -> None:
            sender, peer = senders[i]
            plan = TransferPlan.for_blocks(
                peer,
                SMALL,
                range(block_count),
                range(i * blocks, i * blocks + block_count),
                priority=priority,
                transfer_id=f"t{i}",
            )
            result = await sender.transfer(plan)
            assert result.integrity.value == "verified"
            done.append(priority.name)

        bulk = [asyncio.ensure_future(send(i, blocks, Priority.BULK)) for i in range(3)]
        while not all(sender.statistics().chunks_sent for sender, _ in senders[:3]):  # the bulk transfers are on the link
            await asyncio.sleep(0.001)
        await send(3, 16, Priority.DECODE_CRITICAL)
        await asyncio.gather(*bulk)
    holds = [sender.statistics().holds_received for sender, _ in senders[:3]]
    if arbitrate:
        assert done[0] == "DECODE_CRITICAL" and holds == [2, 2, 2], (done, holds)  # held, then released
    else:
        assert holds == [0, 0, 0]
    assert senders[3][0].statistics().holds_received == 0  # the critical sender is never held
    for i in range(4):  # every byte where it belongs
        count = blocks if i < 3 else 16
        a = np.frombuffer(filled(SMALL, blocks, seed=i).buffers[0], np.uint8).reshape(
            SMALL.num_layers, SMALL.kv_planes, blocks, -1
        )
        b = np.frombuffer(dst.buffers[0], np.uint8).reshape(SMALL.num_layers, SMALL.kv_planes, blocks * 4, -1)
        assert np.array_equal(b[:, :, i * blocks : i * blocks + count], a[:, :, :count])
