"""Soak: mixed transfers under random faults for N minutes; prints what was injected, caught, accepted and leaked.

    .venv/bin/python bench/soak.py --minutes 2 --out bench/results/soak

Each round builds a fresh in-memory network (the mock transport, the same channel code as every transport): one
sender, three receivers, and random fault rules on the sender's frames: dropped, delayed, duplicated and
corrupted chunks at a few percent each, and, in some rounds, a receiver killed or stalled mid-transfer. Every
receiver gets one transfer of 16–64 blocks to a shuffled destination, with a 3 s deadline. Then:

- a transfer that succeeded must be byte-identical at its destination (a corrupted chunk *accepted* is a failure);
- a transfer that failed must raise a typed ``SageTransportError`` within its deadline (anything else, or a wait
  past 10 s, is a *hang*);
- after the round both channels' tables are empty, and at the end threads, descriptors and tasks are back at
  their starting counts (a difference is a *leak*).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import logging
import os
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import structlog  # noqa: E402

from sage_transport import KVCacheSchema, KVMemory, KVTransferChannel, KVTransportConfig, TransferPlan  # noqa: E402
from sage_transport.errors import SageTransportError  # noqa: E402
from sage_transport.transports.mock import MockNetwork, MockTransport  # noqa: E402
from sage_transport.transports.mock_faults import FaultAction, FaultRule  # noqa: E402

SCHEMA = KVCacheSchema(num_layers=8, num_kv_heads=4, head_dim=64, block_size=8)  # 4 KiB pages, 64 KiB per block
BLOCKS = 64


def resources() -> dict[str, int]:
    gc.collect()
    return {"threads": threading.active_count(), "fds": len(os.listdir("/proc/self/fd")), "tasks": len(asyncio.all_tasks())}


def pages(memory: KVMemory) -> np.ndarray:
    return np.frombuffer(memory.buffers[0], np.uint8).reshape(SCHEMA.num_layers, SCHEMA.kv_planes, BLOCKS, -1)


async def one_round(rng: random.Random, totals: collections.Counter[str], kinds: collections.Counter[str]) -> None:
    network = MockNetwork(seed=rng.randrange(1 << 30))
    config = KVTransportConfig(chunk_size=16 << 10, peer_window=8, max_retries=6, ack_timeout_s=0.2)
    src = KVMemory.allocate(SCHEMA, BLOCKS)
    pages(src)[:] = np.frombuffer(rng.randbytes(pages(src).size), np.uint8).reshape(pages(src).shape)
    async with KVTransferChannel(MockTransport(network, name="s"), config, name="s") as sender:
        sender.register(src)
        receivers, dsts, peers = [], [], []
        for i in range(3):
            channel = KVTransferChannel(MockTransport(network, name=f"r{i}"), config, name=f"r{i}")
            await channel.__aenter__()
            dst = KVMemory.allocate(SCHEMA, BLOCKS, fill=0)
            channel.register(dst)
            receivers.append(channel)
            dsts.append(dst)
            peers.append(await sender.connect(await channel.listen()))
        rules = {
            FaultAction.DROP: FaultRule(FaultAction.DROP, src="mock://s", times=None, probability=0.02),
            FaultAction.DELAY: FaultRule(FaultAction.DELAY, src="mock://s", times=None, probability=0.02, delay_s=0.01),
            FaultAction.DUPLICATE: FaultRule(FaultAction.DUPLICATE, src="mock://s", times=None, probability=0.02),
            FaultAction.CORRUPT: FaultRule(FaultAction.CORRUPT, src="mock://s", times=None, probability=0.03),
        }
        for rule in rules.values():
            network.faults.add(rule)
        victim = rng.randrange(3)
        drama = rng.choice(["none", "none", "kill", "stall"])
        sizes = [rng.randint(16, BLOCKS) for _ in range(3)]
        orders = [rng.sample(range(BLOCKS), n) for n in sizes]
        handles = [
            sender.submit(
                TransferPlan.for_blocks(peers[i], SCHEMA, range(sizes[i]), orders[i], transfer_id=f"x{i}", deadline_s=3.0)
            )
            for i in range(3)
        ]
        if drama != "none":
            await asyncio.sleep(rng.uniform(0.0, 0.01))
            if drama == "kill":
                network.kill(f"mock://r{victim}")
            else:
                network.stall(f"mock://r{victim}", 0.2)
            kinds[drama] += 1
        for i, handle in enumerate(handles):
            try:
                result = await asyncio.wait_for(handle.wait(), 10)
            except TimeoutError:
                totals["hangs"] += 1
                continue
            except SageTransportError as exc:
                totals["failed"] += 1
                kinds[f"failed:{type(exc).__name__}"] += 1
                continue
            except Exception as exc:  # an untyped error is a defect
                totals["untyped_errors"] += 1
                kinds[f"untyped:{type(exc).__name__}"] += 1
                continue
            totals["ok"] += 1
            totals["bytes"] += result.bytes
            if not np.array_equal(pages(dsts[i])[:, :, orders[i]], pages(src)[:, :, : sizes[i]]):
                totals["corrupt_accepted"] += 1
        for action, rule in rules.items():
            kinds[action.value] += rule.fired
        totals["corrupt_injected"] += rules[FaultAction.CORRUPT].fired
        totals["corrupt_detected"] += sum(r.statistics().checksum_failures for r in receivers)
        if sender.statistics().transfers_sending:
            totals["left_in_tables"] += 1
        for channel in receivers:
            await channel.aclose()
    totals["rounds"] += 1


async def main(args: argparse.Namespace) -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    rng = random.Random(args.seed)
    totals: collections.Counter[str] = collections.Counter()
    kinds: collections.Counter[str] = collections.Counter()
    await one_round(random.Random(0), collections.Counter(), collections.Counter())  # warm up allocators
    baseline = resources()
    start = time.monotonic()
    while time.monotonic() - start < args.minutes * 60:
        await one_round(rng, totals, kinds)
    await asyncio.sleep(0.2)
    after = resources()
    leaks = {k: after[k] - baseline[k] for k in baseline if after[k] != baseline[k]}
    minutes = (time.monotonic() - start) / 60
    record: dict[str, Any] = {
        "minutes": round(minutes, 2), "rounds": totals["rounds"], "transfers_ok": totals["ok"],
        "transfers_failed_typed": totals["failed"], "untyped_errors": totals["untyped_errors"], "hangs": totals["hangs"],
        "gib_moved": round(totals["bytes"] / (1 << 30), 3), "corrupt_injected": totals["corrupt_injected"],
        "corrupt_detected": totals["corrupt_detected"], "corrupt_accepted": totals["corrupt_accepted"],
        "rounds_with_transfers_left_in_tables": totals["left_in_tables"], "leaks": leaks,
        "faults": dict(sorted(kinds.items())), "seed": args.seed,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/soak")
    import uvloop

    uvloop.run(main(parser.parse_args()))
