"""A receiving channel with device KV in a process of its own: ``python -m sage_transport.testing.device_peer``.

It registers ``--blocks`` blocks (or ``--tokens`` worth) of ``--kind`` memory (``cuda``, ``emulated`` device
memory over memfds, or ``cpu``) for ``--model`` (default: a small test schema), listens and prints
``{"address": ...}``. Then, per line on stdin: ``digest`` prints the xxh3 of its pages in block order and its
counters; ``quit`` (or end of input) ends it. How the device path is tested and measured between two processes
(two on one GPU where a GPU exists: ``tests/test_device.py``, ``bench/gpu_kv_bench.py``).
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

__all__ = ["main", "pages_digest", "schema_for_test"]


def pages_digest(memory: KVMemory, blocks: Sequence[int]) -> str:
    """xxh3 of ``blocks``' pages (every layer and plane), in that order."""
    return xxhash.xxh3_64_hexdigest(device_pages(memory)[:, :, list(blocks)].tobytes())


def schema_for_test() -> KVCacheSchema:
    return KVCacheSchema(num_layers=4, num_kv_heads=2, head_dim=64, block_size=16)  # 4 KiB pages


def schema_of(model: str | None, block_size: int) -> KVCacheSchema:
    return schema_for_test() if model is None else KVCacheSchema.for_model(model, block_size=block_size)


async def _run(args: argparse.Namespace) -> None:
    schema = schema_of(args.model, args.block_size)
    blocks = args.blocks if args.tokens is None else -(-args.tokens // schema.block_size)
    if args.kind == "cuda":
        memory = KVMemory.allocate(schema, blocks, fill=0, device="cuda")
    elif args.kind == "emulated":
        memory = emulated_memory(schema, blocks, shared=True)
    else:
        memory = KVMemory.allocate(schema, blocks, fill=0, shared=True)
    async with KVTransferChannel("ucx", KVTransportConfig.from_string(args.config), name="device-peer") as channel:
        channel.register(memory)
        print(json.dumps({"address": await channel.listen()}), flush=True)
        loop = asyncio.get_running_loop()
        while True:
            line = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
            if line in ("", "quit"):
                return
            if line == "digest":
                stats = channel.statistics()
                print(
                    json.dumps({
                        "digest": pages_digest(memory, range(blocks)),
                        "chunks_received": stats.chunks_received,
                        "checksum_failures": stats.checksum_failures,
                    }),
                    flush=True,
                )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sage_transport.testing.device_peer")
    parser.add_argument("--kind", choices=("cuda", "emulated", "cpu"), required=True)
    parser.add_argument("--model", default=None, help="a model KVCacheSchema.for_model knows (default: a test schema)")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--blocks", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=None, help="instead of --blocks")
    parser.add_argument("--config", default="")
    asyncio.run(_run(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
