"""The main job between processes, against ucx_perftest in the same sitting.

    .venv/bin/python bench/migrate_link_bench.py --out bench/results/migrate [--tokens 32768 65536] [--runs 3]

Each row runs ``sage-transport migrate --json`` ``--runs`` times (a fresh sender and receiver process each
time, 3 timed transfers per run, median per run) and reports the median over runs with min–max, the
``ucx_perftest`` reference each run measured at the chunk size used (on the UCX transports the run used, plus
``cma`` when chunks were placed directly), the ratio, and CPU seconds per GiB on both sides. A second
reference in the same sitting: a shuffled copy of the same pages inside one process (numpy, one pass).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

ROWS = [
    ("ucx, default (4 MiB, direct placement, xxh3)", ["--transport", "ucx"]),
    ("ucx, integrity=none", ["--transport", "ucx", "--config", "integrity=none"]),
    ("ucx, direct placement off (two-sided, staging)", ["--transport", "ucx", "--config", "direct_placement=false"]),
    ("ucx, high-bw preset", ["--preset", "high-bw"]),
    ("tcp (own transport)", ["--transport", "tcp"]),
    ("ucx over UCX tcp, placement off", ["--transport", "ucx", "--config", "ucx_tls=tcp,direct_placement=false"]),
]


def shuffled_copy_gbps(tokens: int) -> float:
    sys.path.insert(0, str(ROOT))
    from sage_transport import KVCacheSchema

    schema = KVCacheSchema.for_model("qwen2.5-7b")
    blocks = schema.blocks_for_tokens(tokens)
    src = np.ones((schema.num_layers, schema.kv_planes, blocks, schema.page_bytes), dtype=np.uint8)
    dst = np.zeros_like(src)
    perm = np.random.default_rng(0).permutation(blocks)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        for layer in range(schema.num_layers):
            dst[layer][:, perm] = src[layer]
        times.append(time.perf_counter() - start)
    return float(src.nbytes / statistics.median(times) / 1e9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "migrate")
    parser.add_argument("--tokens", type=int, nargs="+", default=[32768])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", nargs="*")
    args = parser.parse_args()
    cli = [sys.executable, "-m", "sage_transport.cli", "migrate", "--repeat", "3"]
    results: dict[str, dict[str, list[dict[str, object]]]] = {}
    for tokens in args.tokens:
        for name, extra in ROWS:
            if args.only and not any(o in name for o in args.only):
                continue
            runs = []
            for _ in range(args.runs):
                with tempfile.TemporaryDirectory() as tmp:
                    path = Path(tmp) / "m.json"
                    proc = subprocess.run(
                        [*cli, "--tokens", str(tokens), *extra, "--json", str(path)], capture_output=True, text=True
                    )
                    if proc.returncode != 0:
                        print(f"{name}: failed: {proc.stderr[-500:]}", file=sys.stderr)
                        continue
                    runs.append(json.loads(path.read_text()))
            results.setdefault(str(tokens), {})[name] = runs
            print(f"done: {tokens} {name}", file=sys.stderr, flush=True)
        results.setdefault(str(tokens), {})["reference: shuffled numpy copy in one process"] = [
            {"gbps": shuffled_copy_gbps(tokens)} for _ in range(args.runs)
        ]
    lines = []
    for tokens, rows in results.items():
        lines += [
            f"Qwen2.5-7B, {int(tokens) // 1024}K tokens, shuffled destination, {args.runs} fresh process pairs × 3 transfers",
            "",
            "| what | GB/s median (min–max) | ucx_perftest GB/s (TLS) | ratio median (min–max) "
            "| CPU s/GiB sender / receiver | verified |",
            "|---|---|---|---|---|---|",
        ]
        for name, runs in rows.items():
            if not runs:
                lines.append(f"| {name} | failed | | | | |")
                continue
            g = [float(r["gbps"]) for r in runs]  # type: ignore[arg-type]
            ref = [float(r["reference_gbps"]) for r in runs if r.get("reference_gbps")]  # type: ignore[arg-type]
            ratio = [float(r["ratio"]) for r in runs if r.get("ratio")]  # type: ignore[arg-type]
            tls = runs[0].get("reference_command", "") or ""
            tls = str(tls).split(" ")[0].removeprefix("UCX_TLS=") if tls else ""
            cpu = runs[0].get("cpu_seconds_per_gib") or {}
            cpu_s = [r.get("cpu_seconds_per_gib", {}) for r in runs]
            cpu_text = (
                f"{statistics.median(c['sender'] for c in cpu_s):.3f} / {statistics.median(c['receivers'] for c in cpu_s):.3f}"  # type: ignore[index]
                if cpu and "sender" in cpu
                else ""
            )
            lines.append(
                f"| {name} | {statistics.median(g):.2f} ({min(g):.2f}–{max(g):.2f}) | "
                + (f"{statistics.median(ref):.2f} ({tls})" if ref else "")
                + " | "
                + (f"{statistics.median(ratio):.2f} ({min(ratio):.2f}–{max(ratio):.2f})" if ratio else "")
                + f" | {cpu_text} | {all(r.get('verified', True) for r in runs)} |"
            )
        lines.append("")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    args.out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
