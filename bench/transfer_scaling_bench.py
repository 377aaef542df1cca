"""Time per transfer from one token to thousands of blocks, between two processes, against ucx_perftest.

    .venv/bin/python bench/transfer_scaling_bench.py [--samples 300] [--out bench/results/scaling]

A ``sage-transport serve`` receiver on this host; this process sends back-to-back transfers of Qwen2.5-7B KV
(``sage_transport.migrate.run_migration`` with that peer, so each transfer is timed from ``submit`` to the last
acknowledgement, the job protocol's per-repeat check untimed): one token (56 KiB, 16-token blocks of one token),
then 1, 16, 256 and 4,096 blocks of 16 tokens (896 KiB each), shuffled destinations, per-chunk xxh3 on. Reported:
p50 and p99 per transfer, and the per-block cost (p50 / blocks). The reference in the same sitting: ``ucx_perftest
-t tag_lat`` at 56 KiB on the UCX transports the channel used (one-way, p50).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sage_transport.config import KVTransportConfig  # noqa: E402
from sage_transport.migrate import run_migration  # noqa: E402
from sage_transport.perftest import measure_link  # noqa: E402

CASES = [("one token", 1, 1), ("1 block", 16, 16), ("16 blocks", 256, 16), ("256 blocks", 4096, 16), ("4096 blocks", 65536, 16)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]


async def run(samples: int, config: KVTransportConfig) -> dict[str, object]:
    server = subprocess.Popen(  # noqa: ASYNC220  # started once, before anything is timed
        [sys.executable, "-m", "sage_transport.cli", "serve", "--port", "0"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        address = server.stdout.readline().rsplit("listening on ", 1)[1].strip()
        rows = []
        tls: set[str] = set()
        for name, tokens, block in CASES:
            blocks = max(1, tokens // block)
            repeats = max(5, min(samples, (samples * 16) // blocks))
            record = await run_migration(
                model="qwen2.5-7b", tokens=tokens, block_size=block, config=config, repeats=repeats,
                peers=[address], reference=False, shuffle=blocks > 1,
            )  # fmt: skip
            seconds = record.seconds_all[1:] or record.seconds_all  # the first proves acceptance
            p50 = percentile(seconds, 0.5)
            rows.append(
                {
                    "case": name, "bytes": record.bytes, "blocks": blocks, "transfers": len(seconds),
                    "p50_us": p50 * 1e6, "p99_us": percentile(seconds, 0.99) * 1e6,
                    "per_block_us": p50 * 1e6 / blocks, "placed": record.chunks_placed, "verified": record.verified,
                }
            )  # fmt: skip
            tls |= {lane.split("/")[0] for lanes in record.ucx_transports.values() for lane in lanes} - {"self"}
            print(f"done: {name}", file=sys.stderr, flush=True)
    finally:
        server.kill()
        server.wait()
    ref = await measure_link(56 << 10, ucx_tls=",".join(sorted(tls)) or "sm", test="tag_lat")
    return {"rows": rows, "reference": {"latency_us": ref.latency_us, "command": ref.command}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--config", default="")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scaling")
    args = parser.parse_args()
    config = KVTransportConfig.resolve(args.config, env={})
    import logging

    import structlog
    import uvloop

    # as `sage-transport migrate` runs: warnings only (a line rendered per transfer would be timed), on uvloop
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        result = runner.run(run(args.samples, config))
    ref = result["reference"]
    lines = [
        f"config: {args.config or 'defaults'}; ucx_perftest tag_lat 56 KiB one-way p50: {ref['latency_us']:.1f} µs "  # type: ignore[index]
        f"(`{ref['command']}`)",  # type: ignore[index]
        "",
        "| transfer | bytes | transfers | p50 µs | p99 µs | per block µs | chunks placed | verified |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:  # type: ignore[attr-defined]
        lines.append(
            f"| {r['case']} | {r['bytes']} | {r['transfers']} | {r['p50_us']:.0f} | {r['p99_us']:.0f} | "
            f"{r['per_block_us']:.1f} | {r['placed']} | {r['verified']} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
