"""How fast a peer's death is noticed: a child peer (``sage_transport.testing.peer``) kills itself at a chosen
phase of a transfer; the time from its death (its CLOCK_MONOTONIC stamp) to the typed error on this side.

    .venv/bin/python bench/fault_detection.py --repeats 10 --out bench/results/fault_detection

Receiver deaths (announce, mid-payload, before the ack) are seen by the sender; sender deaths (before the first
chunk header, mid-transfer, at the first ack) by the receiver; SIGKILL, UCX (same host: shared memory) and TCP.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import structlog  # noqa: E402

from sage_transport import KVMemory, KVTransferChannel, KVTransportConfig, TransferPlan  # noqa: E402
from sage_transport.errors import TransportError  # noqa: E402
from sage_transport.testing.peer import PEER_SCHEMA  # noqa: E402

CONFIG = "chunk_size=8KiB,direct_placement=false,peer_window=4"
BLOCKS = 32


async def _spawn(*args: str) -> tuple[asyncio.subprocess.Process, asyncio.StreamReader]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sage_transport.testing.peer", *args, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    return proc, proc.stdout


async def one(transport: str, role: str, phase: str) -> float:
    config = KVTransportConfig.resolve(CONFIG, env={})
    async with KVTransferChannel(transport, config, name="bench") as channel:
        if role == "receiver":  # the child receives and dies; we send
            channel.register(KVMemory.allocate(PEER_SCHEMA, BLOCKS, fill=3))
            proc, out = await _spawn("--role", "receiver", "--transport", transport, "--config", CONFIG, "--die-at", phase)
            hello = json.loads(await out.readline())
            peer = await channel.connect(hello["address"])
            waiter = channel.submit(
                TransferPlan.for_blocks(peer, PEER_SCHEMA, range(BLOCKS), range(BLOCKS), transfer_id="t")
            ).wait()
        else:  # the child sends and dies; we receive
            channel.register(KVMemory.allocate(PEER_SCHEMA, BLOCKS, fill=0))
            address = await channel.listen()
            waiter = channel.wait_received("t")
            proc, out = await _spawn(
                "--role", "sender", "--transport", transport, "--config", CONFIG, "--die-at", phase, "--connect", address
            )
            await out.readline()
        try:
            await asyncio.wait_for(waiter, 10)
            raise RuntimeError("the transfer succeeded although the peer died")
        except TransportError:
            noticed = time.monotonic()
        while "dying" not in (line := json.loads(await out.readline())):
            pass
        dying = line["dying"]
        await proc.wait()
        return (noticed - dying) * 1e3


async def main(args: argparse.Namespace) -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    cases = [(t, "receiver", p) for t in ("ucx", "tcp") for p in ("announce", "payload", "ack")]
    cases += [(t, "sender", p) for t in ("ucx", "tcp") for p in ("header", "payload", "ack")]
    rows: list[dict[str, Any]] = []
    every: list[float] = []
    for transport, role, phase in cases:
        times = sorted([await one(transport, role, phase) for _ in range(args.repeats)])
        every += times
        rows.append(
            {"transport": transport, "died": role, "phase": phase, "ms_p50": statistics.median(times), "ms_max": times[-1]}
        )
        print(f"{transport} {role} dies at {phase}: p50 {rows[-1]['ms_p50']:.1f} ms, max {times[-1]:.1f} ms", flush=True)
    every.sort()
    summary = {
        "faults": len(every),
        "ms_p50": statistics.median(every),
        "ms_p99": every[int(0.99 * (len(every) - 1))],
        "ms_max": every[-1],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"rows": rows, "summary": summary}, indent=2) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/fault_detection")
    import uvloop

    uvloop.run(main(parser.parse_args()))
