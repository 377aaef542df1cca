"""KV on the wire through the channel (issue 8): quantised and compressed chunks land decoded, exactly as the
codec's own round trip gives them; the peers negotiate what each decodes; bad data fails one transfer only.

The KV is synthetic and says so: Student-t (3 degrees of freedom) with one outlier channel, as in test_codec."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import numpy as np
import pytest
import torch

from sage_transport import (
    KVCacheSchema,
    KVMemory,
    KVTransferChannel,
    KVTransportConfig,
    TransferAbortedError,
    TransferPlan,
    UnsupportedError,
)
from sage_transport.codec import CodecSpec, decode, encode, error_stats
from sage_transport.config import Compression
from sage_transport.errors import ConfigError, ProtocolError
from sage_transport.schema import DType
from sage_transport.transports.mock import FaultAction, FaultRule
from sage_transport.wire_codec import ChunkCodec, local_codecs

from .conftest import Pair, channel_pair

SCHEMA = KVCacheSchema(num_layers=4, num_kv_heads=2, head_dim=64, block_size=4)  # page: 512 bf16 elements
BLOCKS = 48
WIRE = ["fp8_e4m3", "fp8_e5m2", "int8", "int4"]


def kv_like_memory(schema: KVCacheSchema = SCHEMA, blocks: int = BLOCKS, seed: int = 0) -> KVMemory:
    memory = KVMemory.allocate(schema, blocks)
    values = torch.frombuffer(memory.buffers[0], dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(seed)
    heavy = torch.distributions.StudentT(3.0).sample((values.numel(),)) * 0.5
    heavy += torch.randn(values.numel(), generator=gen) * 1e-3
    heavy.view(-1, schema.head_dim)[:, 7] *= 20  # an outlier channel
    values.copy_(heavy.to(torch.bfloat16))
    return memory


def round_trip(memory: KVMemory, spec: CodecSpec) -> torch.Tensor:
    """What a receiver must hold: every group of the source through the codec (groups never straddle pages)."""
    values = torch.frombuffer(memory.buffers[0], dtype=torch.bfloat16)
    return decode(encode(values, spec), spec, torch.empty_like(values))


def pages(memory: KVMemory) -> torch.Tensor:
    s = memory.schema
    return torch.frombuffer(memory.buffers[0], dtype=torch.bfloat16).view(s.num_layers, s.kv_planes, memory.num_blocks, -1)


@contextlib.asynccontextmanager
async def kv_pair(config: KVTransportConfig, receiver_config: KVTransportConfig | None = None) -> AsyncIterator[Pair]:
    async with channel_pair(SCHEMA, BLOCKS, config=config, receiver_config=receiver_config, src=kv_like_memory()) as pair:
        yield pair


def assert_landed(pair: Pair, dst_blocks: list[int], expected: torch.Tensor) -> None:
    s = pair.src.schema
    want = expected.view(s.num_layers, s.kv_planes, pair.src.num_blocks, -1)
    assert torch.equal(pages(pair.dst)[:, :, dst_blocks], want)


@pytest.mark.parametrize("compression", ["none", "zstd", "lz4"])
@pytest.mark.parametrize("wire", WIRE)
@pytest.mark.parametrize("chunk_size", [700, 4096, 1 << 20])
async def test_quantised_chunks_land_as_the_codecs_own_round_trip(wire: str, compression: str, chunk_size: int) -> None:
    config = KVTransportConfig(target_dtype=wire, compression=compression, codec_group_size=128)
    async with kv_pair(config) as pair:
        dst = np.random.default_rng(1).permutation(BLOCKS).tolist()
        # a plan's chunk_size is taken as it is (700: pages of 1 KiB split at whole groups, 512 bytes)
        plan = TransferPlan.for_blocks(pair.peer, SCHEMA, range(BLOCKS), dst, chunk_size=chunk_size)
        waiter = asyncio.ensure_future(pair.receiver.wait_received(plan.transfer_id))
        result = await pair.sender.transfer(plan)
        received = await waiter
        expected = round_trip(pair.src, CodecSpec(DType(wire), 128))
        assert_landed(pair, dst, expected)
        assert result.kv_dtype == received.kv_dtype == wire
        assert result.compression == received.compression == compression
        assert result.wire_bytes == received.wire_bytes
        limit = {8: 0.52, 4: 0.29}[DType(wire).bits]  # 1 or 0.5 byte per element, 8 bytes of scales per 128 at most
        assert result.bytes == plan.total_bytes and result.wire_bytes <= result.bytes * limit
        assert result.chunks >= plan.total_bytes // max(chunk_size, 1024)  # the plan's chunk_size held
        stats = error_stats(torch.frombuffer(pair.src.buffers[0], dtype=torch.bfloat16)[: expected.numel()], expected)
        assert stats.mean_rel < (0.6 if wire == "int4" else 0.06)  # int4: two outlier channels per group here


@pytest.mark.parametrize("compression", ["zstd", "lz4"])
async def test_compression_alone_is_lossless_and_shrinks_kv(compression: str) -> None:
    config = KVTransportConfig(compression=compression, chunk_size=8192)
    async with kv_pair(config) as pair:
        plan = TransferPlan.for_blocks(pair.peer, SCHEMA, range(BLOCKS), range(BLOCKS))
        result = await pair.sender.transfer(plan)
        assert torch.equal(pages(pair.dst), pages(pair.src))
        assert result.kv_dtype == "bf16" and result.compression == compression
        # bf16 KV: the exponent bytes compress, the mantissas do not. zstd saves ~20%; lz4 finds nothing, and a
        # chunk compression does not shrink goes as it is, so the wire never carries more than the KV
        if compression == "zstd":
            assert result.wire_bytes < result.bytes * 0.9
        else:
            assert result.wire_bytes <= result.bytes


async def test_a_configured_chunk_size_is_the_size_on_the_wire() -> None:
    """chunk_size=8 KiB with int4: a chunk holds ~3.5x more stored KV, and each message is ~8 KiB on the wire."""
    async with kv_pair(KVTransportConfig(target_dtype="int4", chunk_size=8192)) as pair:
        plan = TransferPlan.for_blocks(pair.peer, SCHEMA, range(BLOCKS), range(BLOCKS))
        result = await pair.sender.transfer(plan)
        assert result.wire_bytes / result.chunks <= 8192 and result.bytes / result.chunks > 3 * 8192


async def test_progressive_layers_arrive_decoded() -> None:
    config = KVTransportConfig(target_dtype="fp8_e4m3", chunk_size=2048)
    async with kv_pair(config) as pair:
        plan = TransferPlan.for_blocks(pair.peer, SCHEMA, range(BLOCKS), range(BLOCKS), progressive=True)
        handle = pair.sender.submit(plan)
        layers = []

        async def watch() -> None:
            async for arrival in pair.receiver.arrivals(plan.transfer_id):
                layers.append(arrival.layer)

        watcher = asyncio.ensure_future(watch())
        for layer in range(SCHEMA.num_layers):
            handle.mark_layer_ready(layer)
            await asyncio.sleep(0.01)
        await handle.wait()
        await watcher
        assert layers == list(range(SCHEMA.num_layers))
        assert_landed(pair, list(range(BLOCKS)), round_trip(pair.src, CodecSpec(DType.FP8_E4M3)))


async def test_corrupted_encoded_chunks_are_resent_and_land_exactly() -> None:
    config = KVTransportConfig(target_dtype="int4", compression="zstd", chunk_size=4096, max_retries=5)
    async with kv_pair(config) as pair:
        pair.network.faults.add(FaultRule(FaultAction.CORRUPT, src="mock://prefill", after=2, times=4))
        pair.network.faults.add(FaultRule(FaultAction.DUPLICATE, src="mock://prefill", times=None, probability=0.3))
        plan = TransferPlan.for_blocks(pair.peer, SCHEMA, range(BLOCKS), range(BLOCKS))
        result = await pair.sender.transfer(plan)
        assert result.retries >= 1
        assert_landed(pair, list(range(BLOCKS)), round_trip(pair.src, CodecSpec(DType.INT4)))
        assert pair.receiver.statistics().checksum_failures >= 1


async def test_a_peer_that_does_not_accept_the_codec_refuses_at_submit_naming_it() -> None:
    config = KVTransportConfig(target_dtype="fp8_e4m3")
    async with kv_pair(config, receiver_config=KVTransportConfig(accept_codecs="int8+zstd")) as pair:
        plan = TransferPlan.for_blocks(pair.peer, SCHEMA, range(4), range(4))
        with pytest.raises(UnsupportedError, match=r"peer 'decode' does not decode fp8_e4m3 \(it accepts: int8, zstd\)"):
            pair.sender.submit(plan)
        int8 = TransferPlan.for_blocks(pair.peer, SCHEMA, range(4), range(4), target_dtype="int8")
        assert (await pair.sender.transfer(int8)).kv_dtype == "int8"


async def test_a_receiver_refuses_an_announced_codec_it_does_not_accept() -> None:
    """A sender that ignores what the peer listed (an older or buggy peer) is refused by the receiver itself."""
    async with kv_pair(KVTransportConfig(target_dtype="int4"), receiver_config=KVTransportConfig(accept_codecs="none")) as pair:
        pair.sender._sessions[pair.peer].peer_codecs = frozenset(WIRE)
        plan = TransferPlan.for_blocks(pair.peer, SCHEMA, range(4), range(4))
        with pytest.raises(TransferAbortedError, match=r"refused by decode: int4 on the wire is not accepted here"):
            await pair.sender.transfer(plan)
        assert pair.receiver.statistics().transfers_refused == 1
        raw = TransferPlan.for_blocks(pair.peer, SCHEMA, range(4), range(4), target_dtype="bf16")
        assert (await pair.sender.transfer(raw)).kv_dtype == "bf16"  # the session lives on


async def test_kv_holding_nan_fails_its_own_transfer_only() -> None:
    async with kv_pair(KVTransportConfig(target_dtype="fp8_e4m3", chunk_size=4096)) as pair:
        pages(pair.src)[2, 1, 5, 3] = float("nan")
        plan = TransferPlan.for_blocks(pair.peer, SCHEMA, range(BLOCKS), range(BLOCKS))
        with pytest.raises(ProtocolError, match=r"cannot quantise KV holding inf or NaN"):
            await pair.sender.transfer(plan)
        pages(pair.src)[2, 1, 5, 3] = 0.0
        again = TransferPlan.for_blocks(pair.peer, SCHEMA, range(BLOCKS), range(BLOCKS))
        assert (await pair.sender.transfer(again)).kv_dtype == "fp8_e4m3"
        stats = pair.sender.statistics()
        assert stats.transfers_failed == 1 and stats.inflight_chunks == stats.queued_chunks == 0


async def test_auto_policy_sends_same_host_peers_kv_as_stored() -> None:
    """``codec_policy=auto``: a peer on this host (here TCP over loopback) is faster than the codec."""
    config = KVTransportConfig(target_dtype="fp8_e4m3", codec_policy="auto", backend="tcp")
    src, dst = kv_like_memory(), KVMemory.allocate(SCHEMA, BLOCKS, fill=0)
    async with KVTransferChannel("tcp", config, name="rx") as rx, KVTransferChannel("tcp", config, name="tx") as tx:
        rx.register(dst)
        tx.register(src)
        peer = await tx.connect(await rx.listen())
        result = await tx.transfer(TransferPlan.for_blocks(peer, SCHEMA, range(BLOCKS), range(BLOCKS)))
        assert result.kv_dtype == "bf16" and result.wire_bytes == result.bytes
        assert torch.equal(pages(dst), pages(src))
        always = config.replace(codec_policy="always")
        tx.config = always
        result = await tx.transfer(TransferPlan.for_blocks(peer, SCHEMA, range(BLOCKS), range(BLOCKS)))
        assert result.kv_dtype == "fp8_e4m3" and result.wire_bytes < result.bytes * 0.52


def test_bad_codec_settings_are_refused_naming_the_field_and_value() -> None:
    with pytest.raises(ConfigError, match=r"codec_policy='sometimes' is not valid; choose one of always, auto"):
        KVTransportConfig(codec_policy="sometimes")
    with pytest.raises(ConfigError, match=r"codec_group_size=33 must be even"):
        KVTransportConfig(codec_group_size=33)
    with pytest.raises(ConfigError, match=r"codec_group_size=1 must be an integer in 2..1048576"):
        KVTransportConfig(codec_group_size=1)
    with pytest.raises(ConfigError, match=r"accept_codecs='fp9' is not valid"):
        KVTransportConfig.from_string("accept_codecs=fp9")
    assert KVTransportConfig.from_string("accept_codecs=zstd+int8").accept_codecs == "int8+zstd"
    with pytest.raises(ConfigError, match=r"compression='brotli' is not valid; choose one of none, lz4, zstd"):
        KVTransportConfig(compression="brotli")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"KV stored as fp8_e4m3 cannot be quantised"):
        ChunkCodec(DType.FP8_E4M3, DType.INT4, 128, Compression.NONE)


async def test_a_wire_dtype_that_is_neither_stored_nor_quantised_is_refused() -> None:
    async with kv_pair(KVTransportConfig()) as pair:
        plan = TransferPlan.for_blocks(pair.peer, SCHEMA, range(4), range(4), target_dtype="fp32")
        with pytest.raises(UnsupportedError, match=r"target_dtype=fp32 is neither the stored bf16 nor a quantised wire dtype"):
            pair.sender.submit(plan)


def test_this_process_decodes_every_codec_the_tests_use() -> None:
    assert set(WIRE) | {"lz4", "zstd"} <= local_codecs()


async def test_auto_policy_sends_as_stored_to_a_peer_that_does_not_accept_the_codec() -> None:
    config = KVTransportConfig(target_dtype="fp8_e4m3", codec_policy="auto")
    async with kv_pair(config, receiver_config=KVTransportConfig(accept_codecs="none")) as pair:
        result = await pair.sender.transfer(TransferPlan.for_blocks(pair.peer, SCHEMA, range(BLOCKS), range(BLOCKS)))
        assert result.kv_dtype == "bf16" and torch.equal(pages(pair.dst), pages(pair.src))
    async with kv_pair(config) as pair:  # a mock peer is not on "this host": the codec runs
        result = await pair.sender.transfer(TransferPlan.for_blocks(pair.peer, SCHEMA, range(BLOCKS), range(BLOCKS)))
        assert result.kv_dtype == "fp8_e4m3"


async def test_auto_policy_measures_the_link_both_ways_and_keeps_the_faster() -> None:
    config = KVTransportConfig(target_dtype="int4", codec_policy="auto")
    big = KVCacheSchema(num_layers=4, num_kv_heads=2, head_dim=128, block_size=16)  # 64 KiB a block: 8 MiB in 128
    async with channel_pair(big, 128, config=config, src=kv_like_memory(big, 128)) as pair:
        tx, peer, src, dst = pair.sender, pair.peer, pair.src, pair.dst
        session = tx._sessions[peer]

        async def kind() -> str:
            return (await tx.transfer(TransferPlan.for_blocks(peer, big, range(128), range(128)))).kv_dtype

        assert await kind() == "int4"  # nothing measured: the codec first (the link might be slow)
        assert set(session.rates) == {"int4+none"}
        assert await kind() == "bf16"  # the codec measured: the link is measured without it once
        assert set(session.rates) == {"int4+none", "as stored"}

        async def kind_given(raw: float, coded: float) -> str:  # each transfer records its real rate: set them anew
            session.rates["as stored"], session.rates["int4+none"] = raw, coded
            return await kind()

        assert [await kind_given(1e12, 1e9) for _ in range(3)] == ["bf16"] * 3  # raw measured 1000x faster
        session.auto_choices = 62
        # the codec measured faster; every 64th choice re-measures the other one
        assert [await kind_given(1e9, 1e12) for _ in range(2)] == ["int4", "bf16"]
        assert torch.equal(pages(dst), pages(src))  # the last transfer went as stored: exact


async def test_a_codec_transfer_cancelled_midway_leaves_both_sides_idle() -> None:
    config = KVTransportConfig(target_dtype="int4", compression="zstd", chunk_size=2048)
    async with kv_pair(config) as pair:
        pair.network.faults.add(FaultRule(FaultAction.DELAY, src="mock://prefill", times=None, delay_s=0.002))
        plan = TransferPlan.for_blocks(pair.peer, SCHEMA, range(BLOCKS), range(BLOCKS))
        handle = pair.sender.submit(plan)
        while handle.progress().chunks_verified < 3:
            await asyncio.sleep(0.001)
        handle.cancel("test")
        with pytest.raises(TransferAbortedError):
            await handle.wait()
        with pytest.raises(TransferAbortedError):
            await pair.receiver.wait_received(plan.transfer_id)
        await asyncio.sleep(0.2)  # encodes and decodes still in worker threads finish and hand their buffers back
        for channel in (pair.sender, pair.receiver):
            stats = channel.statistics()
            assert (stats.transfers_sending, stats.transfers_receiving, stats.inflight_chunks, stats.queued_chunks) == (
                0,
                0,
                0,
                0,
            )
        sender, receiver = pair.sender._sessions[pair.peer], next(iter(pair.receiver._sessions.values()))
        assert sender._encoding == 0 and receiver._decoding == 0
        again = await pair.sender.transfer(TransferPlan.for_blocks(pair.peer, SCHEMA, range(BLOCKS), range(BLOCKS)))
        assert again.kv_dtype == "int4"
