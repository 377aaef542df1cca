"""The main job: migrate a paged KV cache of a real model's shape and verify it byte for byte.

Used by ``sage-transport migrate``. With ``--transport mock`` both ends live in this process on an
in-memory network; the source is filled with a pattern unique per 8-byte word, the destination block
table is shuffled (as a decode instance's allocator leaves it), and after the transfer every destination
page is compared with its source page.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec
import numpy as np

from .channel import KVTransferChannel
from .config import KVTransportConfig
from .errors import SageTransportError
from .memory import KVMemory
from .plan import IntegrityStatus, Priority, TransferPlan
from .schema import KVCacheSchema, Layout

__all__ = ["MigrationRecord", "run_migration"]


class MigrationRecord(msgspec.Struct, frozen=True, kw_only=True):
    """What ``migrate --json`` writes: one record per run (``seconds`` is the median over repeats)."""

    model: str
    tokens: int
    blocks: int
    bytes: int
    seconds: float
    gbps: float
    chunks: int
    transport: str
    preset: str | None
    verified: bool
    integrity: str
    shuffled: bool
    repeats: int
    seconds_all: list[float]
    gbps_min: float
    gbps_max: float
    retries: int
    chunk_size: int


def _fill_pattern(memory: KVMemory, seed: int) -> None:
    for buf in memory.buffers:
        words = np.frombuffer(buf, dtype=np.uint64)
        np.multiply(np.arange(words.size, dtype=np.uint64), np.uint64(0x9E3779B97F4A7C15), out=words)
        words ^= np.uint64(seed)


def _verify(src: KVMemory, dst: KVMemory, schema: KVCacheSchema, dst_of_src: np.ndarray) -> bool:
    nb = src.num_blocks
    a = np.frombuffer(src.buffers[0], dtype=np.uint8).reshape(schema.num_layers, schema.kv_planes, nb, -1)
    b = np.frombuffer(dst.buffers[0], dtype=np.uint8).reshape(schema.num_layers, schema.kv_planes, nb, -1)
    return all(np.array_equal(a[layer], b[layer][:, dst_of_src]) for layer in range(schema.num_layers))


async def run_migration(
    *,
    model: str = "qwen2.5-7b",
    tokens: int = 32768,
    block_size: int = 16,
    transport: str = "mock",
    config: KVTransportConfig | None = None,
    shuffle: bool = True,
    repeats: int = 1,
    seed: int = 0,
) -> MigrationRecord:
    """Run the migration ``repeats`` times and return the record."""
    if transport != "mock":
        raise SageTransportError(f"--transport {transport}: this build runs migrate over the in-process mock only")
    config = config or KVTransportConfig()
    schema = KVCacheSchema.for_model(model, block_size=block_size, layout=Layout.LAYER_KV_BLOCK)
    blocks = schema.blocks_for_tokens(tokens)
    src = KVMemory.allocate(schema, blocks)
    dst = KVMemory.allocate(schema, blocks, fill=0)
    _fill_pattern(src, seed)
    rng = np.random.default_rng(seed)
    dst_of_src = rng.permutation(blocks) if shuffle else np.arange(blocks)

    from .transports.mock import MockNetwork, MockTransport

    network = MockNetwork()
    seconds: list[float] = []
    chunks = retries = 0
    verified = True
    async with (
        KVTransferChannel(MockTransport(network, name="decode"), config, name="decode") as receiver,
        KVTransferChannel(MockTransport(network, name="prefill"), config, name="prefill") as sender,
    ):
        receiver.register(dst)
        sender.register(src)
        peer = await sender.connect(await receiver.listen())
        for i in range(repeats):
            plan = TransferPlan.for_blocks(
                peer, schema, range(blocks), dst_of_src.tolist(), transfer_id=f"migrate-{i}", priority=Priority.BULK
            )
            arrived = asyncio.ensure_future(receiver.wait_received(plan.transfer_id))
            start = time.perf_counter()
            result = await sender.transfer(plan)
            seconds.append(time.perf_counter() - start)
            received = await arrived
            chunks, retries = result.chunks, retries + result.retries
            if config.integrity.value != "none":  # with integrity off only the byte compare below speaks
                verified &= result.integrity is IntegrityStatus.VERIFIED and received.integrity is IntegrityStatus.VERIFIED
    verified = verified and _verify(src, dst, schema, dst_of_src)
    nbytes = blocks * schema.bytes_per_block
    median = float(np.median(seconds))
    return MigrationRecord(
        model=model,
        tokens=tokens,
        blocks=blocks,
        bytes=nbytes,
        seconds=median,
        gbps=nbytes / median / 1e9,
        chunks=chunks,
        transport=transport,
        preset=config.preset,
        verified=verified,
        integrity=config.integrity.value,
        shuffled=shuffle,
        repeats=repeats,
        seconds_all=seconds,
        gbps_min=nbytes / max(seconds) / 1e9,
        gbps_max=nbytes / min(seconds) / 1e9,
        retries=retries,
        chunk_size=config.chunk_size,
    )


def summary_lines(record: MigrationRecord) -> list[str]:
    """Human summary of a record."""
    from .units import format_size

    rows: list[tuple[str, Any]] = [
        ("model", f"{record.model} ({record.tokens} tokens, {record.blocks} blocks{', shuffled' if record.shuffled else ''})"),
        ("bytes", f"{record.bytes} ({format_size(record.bytes)})"),
        ("transport", f"{record.transport} (preset {record.preset or 'none'}, chunk_size {format_size(record.chunk_size)})"),
        ("chunks", record.chunks),
        ("seconds", f"{record.seconds:.4f} median of {record.repeats}"),
        ("bandwidth", f"{record.gbps:.2f} GB/s (min {record.gbps_min:.2f}, max {record.gbps_max:.2f})"),
        ("retries", record.retries),
        ("verified", f"{record.verified} (per-chunk {record.integrity} + full byte compare)"),
    ]
    return [f"{k:>10}  {v}" for k, v in rows]
