"""Shared fixtures: a pair of channels on one in-memory network, with KV memory registered."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np

from sage_transport import KVCacheSchema, KVMemory, KVTransferChannel, KVTransportConfig
from sage_transport.transports.mock import MockNetwork, MockTransport

SMALL = KVCacheSchema(num_layers=4, num_kv_heads=2, head_dim=16, block_size=4)  # page = 256 bytes


@dataclass
class Pair:
    network: MockNetwork
    sender: KVTransferChannel
    receiver: KVTransferChannel
    peer: str
    src: KVMemory
    dst: KVMemory

    def src_pages(self) -> np.ndarray:
        s = self.src.schema
        return np.frombuffer(self.src.buffers[0], np.uint8).reshape(s.num_layers, s.kv_planes, self.src.num_blocks, -1)

    def dst_pages(self) -> np.ndarray:
        s = self.dst.schema
        return np.frombuffer(self.dst.buffers[0], np.uint8).reshape(s.num_layers, s.kv_planes, self.dst.num_blocks, -1)


def filled(schema: KVCacheSchema, blocks: int, seed: int = 1) -> KVMemory:
    memory = KVMemory.allocate(schema, blocks)
    view = np.frombuffer(memory.buffers[0], np.uint8)
    view[:] = np.random.default_rng(seed).integers(0, 256, view.size, dtype=np.uint8)
    return memory


@contextlib.asynccontextmanager
async def channel_pair(
    schema: KVCacheSchema = SMALL,
    blocks: int = 64,
    *,
    config: KVTransportConfig | None = None,
    receiver_config: KVTransportConfig | None = None,
    src: KVMemory | None = None,
    dst: KVMemory | None = None,
    **network_options: object,
) -> AsyncIterator[Pair]:
    """Two channels on one in-memory network; ``src`` (default: random bytes) registered by the sender, ``dst``
    (default: zeros) by the receiver."""
    network = MockNetwork(**network_options)  # type: ignore[arg-type]
    config = config or KVTransportConfig(chunk_size=1024, peer_window=4)
    src = src if src is not None else filled(schema, blocks)
    dst = dst if dst is not None else KVMemory.allocate(schema, blocks, fill=0)
    async with (
        KVTransferChannel(MockTransport(network, name="decode"), receiver_config or config, name="decode") as receiver,
        KVTransferChannel(MockTransport(network, name="prefill"), config, name="prefill") as sender,
    ):
        receiver.register(dst)
        sender.register(src)
        peer = await sender.connect(await receiver.listen())
        yield Pair(network, sender, receiver, peer, src, dst)


def rss_bytes() -> int:
    """This process's resident memory now (not the peak)."""
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def shuffled(blocks: int, seed: int = 0) -> list[int]:
    """A random permutation of ``range(blocks)`` (a destination block table)."""
    return np.random.default_rng(seed).permutation(blocks).tolist()


def assert_idle(*channels: KVTransferChannel) -> None:
    """Nothing sending, receiving, in flight or queued on any of ``channels``."""
    for channel in channels:
        stats = channel.statistics()
        assert (stats.transfers_sending, stats.transfers_receiving, stats.inflight_chunks, stats.queued_chunks) == (0, 0, 0, 0)
