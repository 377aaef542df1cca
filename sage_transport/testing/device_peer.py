"""A receiving channel with device KV in a process of its own: ``python -m sage_transport.testing.device_peer``.

It registers ``--blocks`` blocks of ``--kind`` memory (``cuda``, ``emulated`` device memory over memfds, or
``cpu``), listens, prints ``{"address": ...}``, waits for each ``--transfer`` id and prints one JSON line: the
xxh3 of its pages in block order, the placement its peer used, its counters. How the device path is tested
between two processes (two on one GPU where a GPU exists).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence

import xxhash

from ..channel import KVTransferChannel
from ..config import KVTransportConfig
from ..memory import KVMemory
from ..schema import KVCacheSchema
from .device import device_pages, emulated_memory

__all__ = ["main", "pages_digest"]


def pages_digest(memory: KVMemory, blocks: Sequence[int]) -> str:
    """xxh3 of ``blocks``' pages (every layer and plane), in that order."""
    return xxhash.xxh3_64_hexdigest(device_pages(memory)[:, :, list(blocks)].tobytes())


def schema_for_test() -> KVCacheSchema:
    return KVCacheSchema(num_layers=4, num_kv_heads=2, head_dim=64, block_size=16)  # 4 KiB pages


async def _run(args: argparse.Namespace) -> None:
    schema = schema_for_test()
    if args.kind == "cuda":
        memory = KVMemory.allocate(schema, args.blocks, fill=0, device="cuda")
    elif args.kind == "emulated":
        memory = emulated_memory(schema, args.blocks, shared=True)
    else:
        memory = KVMemory.allocate(schema, args.blocks, fill=0, shared=True)
    async with KVTransferChannel("ucx", KVTransportConfig.from_string(args.config), name="device-peer") as channel:
        channel.register(memory)
        print(json.dumps({"address": await channel.listen()}), flush=True)
        results = [await channel.wait_received(tid) for tid in args.transfer]
        stats = channel.statistics()
        print(
            json.dumps({
                "digest": pages_digest(memory, range(args.blocks)),
                "verified": all(r.integrity.value == "verified" for r in results),
                "chunks_received": stats.chunks_received,
                "checksum_failures": stats.checksum_failures,
            }),
            flush=True,
        )  # fmt: skip
        sys.stdin.readline()  # the sender is done with us


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sage_transport.testing.device_peer")
    parser.add_argument("--kind", choices=("cuda", "emulated", "cpu"), required=True)
    parser.add_argument("--blocks", type=int, default=64)
    parser.add_argument("--config", default="")
    parser.add_argument("--transfer", action="append", default=[])
    asyncio.run(_run(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
