"""One bad peer does not hurt the others (issue 7, promise 8): A→B throughput while A→C dies, against A→B alone,
in the same sitting.

    .venv/bin/python bench/isolation_bench.py --runs 7 --out bench/results/isolation

A is this process; B and C are child receivers (``sage_transport.testing.peer``). Each run moves the same
transfer to B (``--blocks`` blocks of 32 KiB). *Baseline* runs move it alone; *fault* runs start a transfer to C
at the same moment, and C kills itself (SIGKILL) at its first chunk's payload, so its failure, the dead peer's
cleanup and A's recovery all overlap the A→B transfer. Runs alternate baseline / fault so drift hits both alike.
The figure is the median A→B GB/s of each kind, their spread, and fault/baseline (target ≥ 0.8).
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

C_BLOCKS = 64  # the doomed transfer: 2 MiB, C dies at its first chunk anyway


async def _receiver(transport: str, config: str, blocks: int, die: bool) -> tuple[asyncio.subprocess.Process, dict[str, Any]]:
    args = ["--role", "receiver", "--transport", transport, "--config", config, "--blocks", str(blocks)]
    args += ["--die-at", "payload", "--how", "kill"] if die else []
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sage_transport.testing.peer", *args, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    return proc, json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))


async def run_transport(transport: str, config_text: str, blocks: int, runs: int) -> dict[str, Any]:
    config = KVTransportConfig.resolve(config_text, env={})
    nbytes = blocks * PEER_SCHEMA.bytes_per_block
    rates: dict[str, list[float]] = {"baseline": [], "fault": []}
    b, b_hello = await _receiver(transport, config_text, blocks, die=False)
    try:
        async with KVTransferChannel(transport, config, name="A") as channel:
            channel.register(KVMemory.allocate(PEER_SCHEMA, blocks, fill=3))
            to_b = await channel.connect(b_hello["address"])
            plan = TransferPlan.for_blocks(to_b, PEER_SCHEMA, range(blocks), range(blocks))
            await channel.transfer(plan)  # warm-up
            for run in range(2 * runs):
                kind = "fault" if run % 2 else "baseline"
                doomed = None
                if kind == "fault":
                    c, c_hello = await _receiver(transport, config_text, C_BLOCKS, die=True)
                    to_c = await channel.connect(c_hello["address"])
                    doomed = channel.submit(TransferPlan.for_blocks(to_c, PEER_SCHEMA, range(C_BLOCKS), range(C_BLOCKS)))
                start = time.perf_counter()
                await channel.transfer(TransferPlan.for_blocks(to_b, PEER_SCHEMA, range(blocks), range(blocks)))
                rates[kind].append(nbytes / (time.perf_counter() - start) / 1e9)
                if doomed is not None:
                    try:
                        await asyncio.wait_for(doomed.wait(), 10)
                        raise SystemExit("the transfer to the dying peer C succeeded: no fault was injected")
                    except TransportError:
                        pass
                    if c.returncode is None:
                        c.kill()
                    await c.wait()
    finally:
        if b.returncode is None:
            b.kill()
        await b.wait()
    base, fault = statistics.median(rates["baseline"]), statistics.median(rates["fault"])
    return {
        "transport": transport,
        "config": config_text,
        "bytes": nbytes,
        "runs": runs,
        "baseline_gbps": rates["baseline"],
        "fault_gbps": rates["fault"],
        "baseline_median": round(base, 3),
        "baseline_spread": [round(min(rates["baseline"]), 3), round(max(rates["baseline"]), 3)],
        "fault_median": round(fault, 3),
        "fault_spread": [round(min(rates["fault"]), 3), round(max(rates["fault"]), 3)],
        "ratio": round(fault / base, 3),
    }


async def main(args: argparse.Namespace) -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    rows = [await run_transport(t, args.config, args.blocks, args.runs) for t in args.transports]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=2) + "\n")
    lines = [
        "| transport | A→B alone GB/s, median (min–max) | A→B while A→C dies | fault / alone |",
        "|---|---|---|---|",
    ]
    for row in rows:
        alone, fault = row["baseline_spread"], row["fault_spread"]
        lines.append(
            f"| {row['transport']} | {row['baseline_median']:.2f} ({alone[0]:.2f}–{alone[1]:.2f}) "
            f"| {row['fault_median']:.2f} ({fault[0]:.2f}–{fault[1]:.2f}) | {row['ratio']:.2f} |"
        )
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="runs of each kind (default 7)")
    parser.add_argument("--blocks", type=int, default=8192, help="blocks of 32 KiB per transfer (default 8192: 256 MiB)")
    parser.add_argument("--config", default="chunk_size=1MiB,direct_placement=false")
    parser.add_argument("--transports", nargs="*", default=["ucx", "tcp"])
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/isolation")
    asyncio.run(main(parser.parse_args()))
