"""Planner/scheduler bench: Python time to plan and submit a 32K-token Qwen2.5-7B transfer with 16-token
blocks and a shuffled destination block table. Target: <= 1 ms per 1,000 chunks.

    .venv/bin/python bench/plan_bench.py [--tokens 32768] [--runs 15] [--json PATH]

Measures (a) the planner alone (`plan_chunks` + the per-chunk lists the hot path indexes) and (b) the whole
synchronous `KVTransferChannel.submit()` (validation, planning, announce encoding, scheduler entry) on an open
channel over the mock transport, with gather off (one chunk per 16 KiB page: the worst case) and on.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import numpy as np

from sage_transport import KVCacheSchema, KVGeometry, KVMemory, KVTransferChannel, KVTransportConfig, TransferPlan, plan_chunks
from sage_transport.transports.mock import MockNetwork, MockTransport


def _summary(samples: list[float], chunks: int) -> dict[str, float]:
    med = statistics.median(samples)
    return {
        "chunks": chunks,
        "median_ms": med * 1e3,
        "min_ms": min(samples) * 1e3,
        "max_ms": max(samples) * 1e3,
        "ms_per_1000_chunks": med * 1e3 / chunks * 1000,
    }


async def _submit_bench(schema: KVCacheSchema, blocks: int, dst: list[int], gather: bool, runs: int) -> dict[str, float]:
    network = MockNetwork()
    config = KVTransportConfig(gather=gather, chunk_size=4 << 20)
    samples: list[float] = []
    chunks = 0
    async with (
        KVTransferChannel(MockTransport(network, name="d"), config, name="d") as rx,
        KVTransferChannel(MockTransport(network, name="p"), config, name="p") as tx,
    ):
        rx.register(KVMemory.allocate(schema, blocks))
        tx.register(KVMemory.allocate(schema, blocks))
        peer = await tx.connect(await rx.listen())
        for i in range(runs):
            plan = TransferPlan.for_blocks(peer, schema, range(blocks), dst, transfer_id=f"b{i}")
            start = time.perf_counter()
            handle = tx.submit(plan)
            samples.append(time.perf_counter() - start)
            chunks = handle.progress().chunks
            handle.cancel("bench")
            await asyncio.sleep(0)
    return _summary(samples, chunks)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    schema = KVCacheSchema.for_model("qwen2.5-7b", block_size=16)
    blocks = schema.blocks_for_tokens(args.tokens)
    dst = np.random.default_rng(0).permutation(blocks).tolist()
    geometry = KVGeometry(schema.layout, blocks)
    plan = TransferPlan.for_blocks("peer", schema, range(blocks), dst)
    results: dict[str, dict[str, float]] = {}
    for gather in (False, True):
        samples = []
        for _ in range(args.runs):
            start = time.perf_counter()
            table = plan_chunks(schema, plan.mappings, geometry, geometry, 4 << 20, gather=gather)
            table.lists()
            samples.append(time.perf_counter() - start)
        results[f"plan_chunks gather={gather}"] = _summary(samples, len(table))
        results[f"channel.submit gather={gather}"] = asyncio.run(_submit_bench(schema, blocks, dst, gather, args.runs))
    print(f"qwen2.5-7b, {args.tokens} tokens, {blocks} blocks of 16 tokens, shuffled destination, {args.runs} runs")
    print(f"{'what':<28}{'chunks':>9}{'median ms':>11}{'min':>8}{'max':>8}{'ms/1k chunks':>14}")
    for name, r in results.items():
        print(
            f"{name:<28}{r['chunks']:>9}{r['median_ms']:>11.2f}{r['min_ms']:>8.2f}{r['max_ms']:>8.2f}{r['ms_per_1000_chunks']:>14.3f}"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
