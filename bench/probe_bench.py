"""Topology probe time on this host (target: ≤100 ms without GPUs).

    .venv/bin/python bench/probe_bench.py --runs 30 --out bench/results/probe

Timed in this process: ``TopologyManager().probe()`` as ``sage-transport probe`` runs it (sysfs, every vendor
probe, the memory-copy measurement, routes), and the light probe the UCX transport runs when it is created
(sysfs only). Then the whole command ``sage-transport probe --json`` as a user runs it, against
``python -c "import sage_transport"`` (interpreter start and imports) measured in the same sitting.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sage_transport.hw import TopologyManager  # noqa: E402


def timed(fn, runs: int) -> list[float]:  # type: ignore[no-untyped-def]
    fn()  # warm: first-time imports (NVML binding) and page cache
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1e3)
    return out


def stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median": statistics.median(ordered),
        "p90": ordered[int(0.9 * (len(ordered) - 1))],
        "min": ordered[0],
        "max": ordered[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/probe")
    args = parser.parse_args()
    full = timed(lambda: TopologyManager().probe(), args.runs)
    light = timed(lambda: TopologyManager(vendors=(), measure_memory=False).probe(), args.runs)
    info = TopologyManager().probe()
    cli_runs = max(5, args.runs // 3)
    cli = timed(lambda: subprocess.run(["sage-transport", "probe", "--json"], capture_output=True, check=True), cli_runs)
    imp = timed(lambda: subprocess.run([sys.executable, "-c", "import sage_transport"], check=True), cli_runs)
    result = {
        "full_probe_ms": stats(full),
        "light_probe_ms": stats(light),
        "cli_probe_json_ms": stats(cli),
        "python_import_sage_transport_ms": stats(imp),
        "per_probe_ms": {p.name: p.elapsed_ms for p in info.probes},
        "devices": len(info.devices),
        "links": len(info.links),
        "runs": args.runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    rows = [
        ("`TopologyManager().probe()` (what `probe` runs)", "full_probe_ms"),
        ("light probe (sysfs only; each UCX transport)", "light_probe_ms"),
        ("`sage-transport probe --json`, whole command", "cli_probe_json_ms"),
        ("reference: `python -c 'import sage_transport'`", "python_import_sage_transport_ms"),
    ]
    lines = ["| what | median ms | p90 ms | min–max ms |", "|---|---|---|---|"]
    for label, key in rows:
        s = result[key]
        lines.append(f"| {label} | {s['median']:.1f} | {s['p90']:.1f} | {s['min']:.1f}–{s['max']:.1f} |")
    lines.append("")
    lines.append("Per probe (one run): " + ", ".join(f"{k} {v:.1f} ms" for k, v in result["per_probe_ms"].items()))
    text = "\n".join(lines) + "\n"
    args.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
