"""Receiver-initiated transfers (``channel.pull``): a decode side fetches a prefill's KV, as vLLM's and LMDeploy's
decode instances do. The peer answers with an ordinary transfer, or refuses with its reason."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from sage_transport import (
    KVMemory,
    KVTransferChannel,
    KVTransportConfig,
    PeerDeadError,
    PlanError,
    TransferAbortedError,
    TransferPlan,
    TransferTimeoutError,
    TransportError,
)
from sage_transport.transports.mock import FaultAction, FaultRule, MockNetwork, MockTransport
from sage_transport.wire import Pull, decode_message

from .conftest import SMALL, Pair, channel_pair


def pages(memory: KVMemory) -> np.ndarray:
    s = memory.schema
    return np.frombuffer(memory.buffers[0], np.uint8).reshape(s.num_layers, s.kv_planes, memory.num_blocks, -1)


def is_pull(header: bytes) -> bool:
    return type(decode_message(header)) is Pull


def pull_plan(pair: Pair, src: list[int], dst: list[int], **options: object) -> TransferPlan:
    """A plan the receiver (decode) runs against the sender (prefill): src blocks are prefill's."""
    peer = next(iter(pair.receiver.peers))
    return TransferPlan.for_blocks(peer, SMALL, src, dst, **options)  # type: ignore[arg-type]


async def test_a_pulled_transfer_lands_byte_identical_in_the_pullers_blocks() -> None:
    async with channel_pair() as pair:
        src, dst = [5, 9, 1, 60], [0, 1, 2, 3]
        result = await pair.receiver.pull(pull_plan(pair, src, dst))
        assert result.bytes == len(src) * SMALL.bytes_per_block and result.peer == "prefill"
        assert np.array_equal(pages(pair.dst)[:, :, dst], pages(pair.src)[:, :, src])
        assert pair.sender.statistics().transfers_completed == 1 and pair.sender._counters["pulls_served"] == 1
        again = await pair.receiver.pull(pull_plan(pair, [2], [7], target_dtype="bf16"))
        assert again.chunks >= 1 and np.array_equal(pages(pair.dst)[:, :, 7], pages(pair.src)[:, :, 2])


async def test_pulls_run_concurrently_with_pushes_both_ways() -> None:
    async with channel_pair(blocks=64) as pair:
        pulls = [pair.receiver.pull(pull_plan(pair, [i], [i])) for i in range(0, 16)]
        push = pair.sender.transfer(TransferPlan.for_blocks(pair.peer, SMALL, range(16, 32), range(16, 32)))
        results = await asyncio.gather(*pulls, push)
        assert len(results) == 17
        assert np.array_equal(pages(pair.dst)[:, :, :32], pages(pair.src)[:, :, :32])


async def test_a_peer_with_allow_pull_off_refuses_with_its_reason() -> None:
    async with channel_pair(config=KVTransportConfig(allow_pull=False)) as pair:
        with pytest.raises(TransferAbortedError, match=r"will not send transfer .*allow_pull=false"):
            await pair.receiver.pull(pull_plan(pair, [1], [1]))
        assert pair.sender.statistics().transfers_refused == 1


async def test_a_pull_naming_blocks_the_sender_lacks_is_refused_naming_them() -> None:
    async with channel_pair(blocks=8) as pair:
        with pytest.raises(TransferAbortedError, match=r"src block 99 is out of range"):
            await pair.receiver.pull(pull_plan(pair, [99], [1]))
        with pytest.raises(PlanError, match=r"peer 'nobody' is not connected"):
            await pair.receiver.pull(TransferPlan.for_blocks("nobody", SMALL, [1], [1]))
        plan = pull_plan(pair, [1], [1])
        await pair.receiver.pull(plan)
        with pytest.raises(PlanError, match=r"already being received or was received"):
            await pair.receiver.pull(plan)


async def test_a_pull_from_a_silent_peer_misses_its_deadline_and_a_dead_one_fails() -> None:
    async with channel_pair() as pair:
        pulls_only = FaultRule(FaultAction.DROP, src="mock://decode", times=1, payload_only=False, match=is_pull)
        pair.network.faults.add(pulls_only)  # the Pull is lost
        with pytest.raises(TransferTimeoutError, match=r"missed its 0.2s deadline"):
            await pair.receiver.pull(pull_plan(pair, [1], [1], deadline_s=0.2))
        assert not pair.receiver._sessions["prefill"].pulls
        pair.network.faults.add(FaultRule(FaultAction.DROP, src="mock://decode", times=None, payload_only=False, match=is_pull))
        waiting = asyncio.ensure_future(pair.receiver.pull(pull_plan(pair, [2], [2])))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        pair.network.kill("mock://prefill")  # the prefill side dies before it ever answers
        with pytest.raises((PeerDeadError, TransportError)):
            await asyncio.wait_for(waiting, 10)


async def test_cancelling_a_pull_aborts_it_at_the_sender() -> None:
    network = MockNetwork()
    schema = SMALL
    src, dst = KVMemory.allocate(schema, 256, fill=7), KVMemory.allocate(schema, 256, fill=0)
    config = KVTransportConfig(chunk_size=512, peer_window=1)
    async with (
        KVTransferChannel(MockTransport(network, name="p"), config, name="p") as prefill,
        KVTransferChannel(MockTransport(network, name="d"), config, name="d") as decode,
    ):
        prefill.register(src)
        decode.register(dst)
        await decode.connect(await prefill.listen())
        network.faults.add(FaultRule(FaultAction.DELAY, src="mock://p", times=None, delay_s=0.002))
        task = asyncio.ensure_future(decode.pull(TransferPlan.for_blocks("p", schema, range(256), range(256))))
        while not prefill.statistics().transfers_sending:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):
            if not prefill.statistics().transfers_sending:
                break
            await asyncio.sleep(0.01)
        assert prefill.statistics().transfers_sending == 0 and decode.statistics().transfers_receiving == 0


@pytest.mark.parametrize("transport", ["ucx", "tcp"])
async def test_pull_from_a_child_process(transport: str) -> None:
    """A real transport between processes: the child holds the KV (7s), this side pulls it into shuffled blocks."""
    import json
    import sys

    from sage_transport.testing.peer import PEER_SCHEMA

    if transport == "ucx":
        pytest.importorskip("ucxx")
    blocks = 32
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sage_transport.testing.peer", "--role", "source", "--transport", transport,
        "--blocks", str(blocks), stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert child.stdout is not None
        hello = json.loads(await asyncio.wait_for(child.stdout.readline(), 60))
        memory = KVMemory.allocate(PEER_SCHEMA, blocks, fill=0)
        async with KVTransferChannel(transport, KVTransportConfig(), name="puller") as channel:
            channel.register(memory)
            peer = await channel.connect(hello["address"])
            dst = np.random.default_rng(3).permutation(blocks).tolist()
            plan = TransferPlan.for_blocks(peer, PEER_SCHEMA, range(blocks), dst, deadline_s=60)
            result = await channel.pull(plan)
            assert result.bytes == blocks * PEER_SCHEMA.bytes_per_block
            assert bool((np.frombuffer(memory.buffers[0], np.uint8) == 7).all())
    finally:
        child.kill()
        await child.wait()


async def test_a_deferred_pull_is_served_layer_by_layer_from_the_senders_own_blocks() -> None:
    """The prefill defers a pull that arrives before its KV exists, then serves it progressively: a layer's chunks
    go as soon as it is marked ready (layer-wise overlap with the compute producing the KV)."""
    async with channel_pair() as pair:
        asked: list[TransferPlan] = []
        pair.sender.pull_resolver = lambda peer, plan: asked.append(plan)  # type: ignore[func-returns-value]
        pull = asyncio.ensure_future(pair.receiver.pull(pull_plan(pair, [0, 1], [10, 11], transfer_id="req-9")))
        while not pair.sender.deferred_pulls:
            await asyncio.sleep(0.001)
        assert list(pair.sender.deferred_pulls) == ["req-9"] and asked[0].peer == "decode"
        mapping = asked[0].mappings[0]
        mine = TransferPlan(
            transfer_id="req-9", peer="decode", schema=SMALL, progressive=True,
            mappings=(type(mapping)(mapping.layer_start, mapping.layer_stop, (40, 41), mapping.dst_blocks),),
        )  # fmt: skip
        pair.sender.serve_pull("req-9", mine)
        pair.sender.mark_layer_ready("req-9", [0, 1])
        arrived = [a.layer async for a in _first_layers(pair.receiver, "req-9", 2)]
        assert arrived == [0, 1] and not pull.done()  # layers 2 and 3 are not computed yet
        pair.sender.mark_layer_ready("req-9", [2, 3])
        result = await pull
        assert result.bytes == 2 * SMALL.bytes_per_block
        assert np.array_equal(pages(pair.dst)[:, :, [10, 11]], pages(pair.src)[:, :, [40, 41]])


async def _first_layers(channel: KVTransferChannel, tid: str, count: int):  # type: ignore[no-untyped-def]
    seen = 0
    async for arrival in channel.arrivals(tid):
        yield arrival
        seen += 1
        if seen == count:
            return


async def test_a_resolver_refuses_or_serves_wrongly_and_the_puller_hears_why() -> None:
    async with channel_pair() as pair:

        def resolver(peer: str, plan: TransferPlan) -> TransferPlan | None:
            if plan.transfer_id == "unknown":
                raise PlanError("no request 'unknown' here")
            return None

        pair.sender.pull_resolver = resolver
        with pytest.raises(TransferAbortedError, match="no request 'unknown' here"):
            await pair.receiver.pull(pull_plan(pair, [0], [0], transfer_id="unknown"))
        pull = asyncio.ensure_future(pair.receiver.pull(pull_plan(pair, [0], [3], transfer_id="wrong")))
        while "wrong" not in pair.sender.deferred_pulls:
            await asyncio.sleep(0.001)
        with pytest.raises(PlanError, match="other destination blocks"):
            pair.sender.serve_pull("wrong", TransferPlan.for_blocks("decode", SMALL, [0], [4], transfer_id="wrong"))
        with pytest.raises(TransferAbortedError, match="other destination blocks"):
            await pull
        later = asyncio.ensure_future(pair.receiver.pull(pull_plan(pair, [0], [5], transfer_id="later")))
        while "later" not in pair.sender.deferred_pulls:
            await asyncio.sleep(0.001)
        pair.sender.refuse_pull("later", "the request was aborted")
        with pytest.raises(TransferAbortedError, match="the request was aborted"):
            await later
        with pytest.raises(PlanError, match="no pull of transfer 'later'|no pull of transfer later"):
            pair.sender.serve_pull("later")
        assert not pages(pair.dst)[:, :, [3, 4, 5]].any()


async def test_a_one_chunk_transfer_is_one_frame_each_way() -> None:
    """A small transfer's announcement travels as its chunk's header: one frame out, one acknowledgement back."""
    async with channel_pair(config=KVTransportConfig(chunk_size=1 << 20)) as pair:
        sender_conn = pair.sender._sessions[pair.peer].conn
        receiver_conn = next(iter(pair.receiver._sessions.values())).conn
        sent, acked = sender_conn.statistics().frames_sent, receiver_conn.statistics().frames_sent
        plan = TransferPlan.for_blocks(pair.peer, SMALL, [3, 1], [5, 9])
        result = await pair.sender.transfer(plan)
        assert result.chunks == 1 and result.integrity.value == "verified"
        assert sender_conn.statistics().frames_sent - sent == 1  # announcement and chunk together
        assert receiver_conn.statistics().frames_sent - acked == 1  # one acknowledgement
        received = await pair.receiver.wait_received(plan.transfer_id)
        assert received.bytes == plan.total_bytes
    assert np.array_equal(pages(pair.dst)[:, :, [5, 9]], pages(pair.src)[:, :, [3, 1]])


async def test_a_one_chunk_pull_that_fails_before_its_frame_went_out_still_tells_the_puller() -> None:
    """The announcement waits for the chunk; a transfer that ends first sends it anyway, then the abort, so a pull
    that asked for it fails with the reason instead of waiting for a transfer it would never hear of."""
    async with channel_pair(config=KVTransportConfig(chunk_size=1 << 20)) as pair:
        pair.sender.pull_resolver = lambda peer, plan: None  # deferred: we serve it below
        pull = asyncio.ensure_future(pair.receiver.pull(pull_plan(pair, [0], [2], transfer_id="gone")))
        while not pair.sender.deferred_pulls:
            await asyncio.sleep(0.001)
        handle = pair.sender.serve_pull("gone")
        handle.cancel("the prefill was preempted")  # before the writer could send anything
        with pytest.raises(TransferAbortedError, match="the prefill was preempted"):
            await asyncio.wait_for(pull, 5)
