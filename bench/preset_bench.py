"""Preset trade-offs: bulk bandwidth and small-message latency of each preset between two processes.

    .venv/bin/python bench/preset_bench.py --rounds 3 --out bench/results/presets

Per round, for each preset (the order rotates every round so no preset always runs first):

- **bulk**: ``migrate`` of a Qwen2.5-7B cache, 8,192 tokens (448 MiB), shuffled destination, to a local
  ``serve`` process, 3 transfers, median GB/s (the main job's own path and figure);
- **small transfer**: 300 transfers of one token of KV (56 KiB: 28 layers × K/V × 1 KiB pages) to the
  same kind of receiver, submit → acknowledged, p50/p99 (the first 20 are warm-up and dropped), twice:
  back to back, and 2 ms apart (*paced*: like decode steps, long enough for an idle progress engine to
  go back to sleep, so ``blocking`` progress pays its wake-up and ``polling`` does not);
- **link**: one-way latency of an 8 B message on the preset's own transport settings (progress mode),
  ping-pong between two processes, p50/p99: 3,000 round trips back to back and 1,000 paced 2 ms apart;
- **reference**: ``ucx_perftest`` in the same round: tag_bw 8 MiB over shared memory+CMA and tag_lat 8 B.

Reported: the median over rounds of each figure, with the min–max over rounds.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import structlog  # noqa: E402
from link_bench import sage_row  # noqa: E402

from sage_transport.config import KVTransportConfig  # noqa: E402
from sage_transport.migrate import run_migration  # noqa: E402
from sage_transport.perftest import measure_link  # noqa: E402

PRESETS = ["high-bw", "low-latency", "low-cost"]
PACE_S = 0.002  # between paced transfers and pings: beyond the 200 µs a blocking progress engine spins after activity


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]


def link_options(config: KVTransportConfig) -> dict[str, Any]:
    if config.backend == "ucx":
        return {"progress_mode": config.progress_mode.value}
    return {}


async def one_preset(name: str, bulk_tokens: int, small_samples: int) -> dict[str, Any]:
    config = KVTransportConfig.resolve(f"preset={name}", env={})
    bulk = await run_migration(
        model="qwen2.5-7b", tokens=bulk_tokens, block_size=16, transport=config.backend, config=config,
        repeats=3, reference=False,
    )  # fmt: skip
    out: dict[str, Any] = {"bulk_gbps": bulk.gbps, "bulk_bytes": bulk.bytes, "placement": bulk.placement}
    verified = bulk.verified
    for label, pause in (("small", 0.0), ("paced", PACE_S)):
        small = await run_migration(
            model="qwen2.5-7b", tokens=1, block_size=1, transport=config.backend, config=config, shuffle=False,
            repeats=small_samples + 20, reference=False, pause_s=pause,
        )  # fmt: skip
        times = [s * 1e6 for s in small.seconds_all[20:]]
        out[f"{label}_p50_us"], out[f"{label}_p99_us"] = _pct(times, 0.5), _pct(times, 0.99)
        out["small_bytes"] = small.bytes
        verified &= small.verified
    for label, gap, rounds in (("link", 0.0, 3000), ("link_paced", PACE_S, 1000)):
        link = await sage_row(config.backend, link_options(config), [], [8], 1, lat_gap_s=gap, lat_rounds=rounds)
        out[f"{label}_p50_us"], out[f"{label}_p99_us"] = link["lat"][8]["p50"], link["lat"][8]["p99"]
    out["verified"] = verified
    return out


async def main(args: argparse.Namespace) -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    rounds: list[dict[str, Any]] = []
    for r in range(args.rounds):
        order = PRESETS[r % len(PRESETS) :] + PRESETS[: r % len(PRESETS)]
        row: dict[str, Any] = {}
        for name in order:
            row[name] = await one_preset(name, args.bulk_tokens, args.small_samples)
            shown = {k: round(v, 2) if isinstance(v, float) else v for k, v in row[name].items()}
            print(f"round {r + 1} {name}: {json.dumps(shown)}", flush=True)
        bw = await measure_link(8 << 20, ucx_tls="sm,cma,self")
        lat = await measure_link(8, ucx_tls="sm,self", test="tag_lat")
        row["reference"] = {
            "perftest_bw_8mib_gbps": bw.gbps,
            "perftest_lat_8b_us": lat.latency_us,
            "commands": [bw.command, lat.command],
        }
        print(f"round {r + 1} reference: {bw.gbps:.2f} GB/s, {lat.latency_us:.2f} µs", flush=True)
        rounds.append(row)
    summary = summarise(rounds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"rounds": rounds, "summary": summary}, indent=2) + "\n")
    text = markdown(summary, args)
    args.out.with_suffix(".md").write_text(text)
    print(text)


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in [*PRESETS, "reference"]:
        keys = [
            k
            for k in rounds[0][name]
            if isinstance(rounds[0][name][k], (int, float)) and not isinstance(rounds[0][name][k], bool)
        ]
        out[name] = {
            k: {
                "median": statistics.median(r[name][k] for r in rounds),
                "min": min(r[name][k] for r in rounds),
                "max": max(r[name][k] for r in rounds),
            }
            for k in keys
        }
        if name != "reference":
            out[name]["placement"] = rounds[0][name]["placement"]
            out[name]["verified"] = all(r[name]["verified"] for r in rounds)
    hb, ll = out["high-bw"], out["low-latency"]
    checks = {"high-bw beats low-latency on bulk GB/s": hb["bulk_gbps"]["median"] > ll["bulk_gbps"]["median"]}
    for key, what in (("small", "one-token transfers back to back"), ("paced", "one-token transfers 2 ms apart"),
                      ("link", "8 B link back to back"), ("link_paced", "8 B link 2 ms apart")):  # fmt: skip
        for q in ("p50", "p99"):
            k = f"{key}_{q}_us"
            checks[f"low-latency beats high-bw on {what}, {q}"] = ll[k]["median"] < hb[k]["median"]
    out["checks"] = checks
    return out


def markdown(summary: dict[str, Any], args: argparse.Namespace) -> str:
    ref = summary["reference"]

    def cell(name: str, key: str, digits: int = 1) -> str:
        v = summary[name][key]
        return f"{v['median']:.{digits}f} ({v['min']:.{digits}f}–{v['max']:.{digits}f})"

    lines = [
        f"Rounds: {args.rounds}; bulk: {args.bulk_tokens} tokens of qwen2.5-7b; "
        f"small: {args.small_samples} transfers of one token (56 KiB).",
        f"Reference (ucx_perftest, same rounds): tag_bw 8 MiB sm+cma {cell('reference', 'perftest_bw_8mib_gbps', 2)} GB/s; "
        f"tag_lat 8 B sm {cell('reference', 'perftest_lat_8b_us', 2)} µs.",
        "",
        "| preset | bulk GB/s | ratio to perftest | one token, back to back: p50 µs | p99 µs "
        "| one token, paced: p50 µs | p99 µs | link 8 B: p50 µs | p99 µs | link 8 B paced: p50 µs | p99 µs | placement |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in PRESETS:
        ratio = summary[name]["bulk_gbps"]["median"] / ref["perftest_bw_8mib_gbps"]["median"]
        lines.append(
            f"| {name} | {cell(name, 'bulk_gbps', 2)} | {ratio:.2f} | {cell(name, 'small_p50_us', 0)} "
            f"| {cell(name, 'small_p99_us', 0)} | {cell(name, 'paced_p50_us', 0)} | {cell(name, 'paced_p99_us', 0)} "
            f"| {cell(name, 'link_p50_us')} | {cell(name, 'link_p99_us')} "
            f"| {cell(name, 'link_paced_p50_us')} | {cell(name, 'link_paced_p99_us')} | "
            f"{summary[name]['placement']} |"
        )
    lines.append("")
    for check, ok in summary["checks"].items():
        lines.append(f"- {check}: {'yes' if ok else 'NO'}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bulk-tokens", type=int, default=8192)
    parser.add_argument("--small-samples", type=int, default=300)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/presets")
    import uvloop

    uvloop.run(main(parser.parse_args()))
