"""The main job against its limit and against NIXL, every figure from the same run.

    .venv/bin/python bench/migrate_vs_nixl_bench.py [--tokens 32768 65536 131072] [--runs 3] [--out bench/results/migrate_vs_nixl]

Each run is one ``sage-transport migrate --compare nixl --json`` (defaults: UCX, 4 MiB chunks, per-chunk xxh3,
shuffled destination, 3 timed transfers): a fresh sender and receiver, then the in-process shuffled copy of the same
pages (the ``limit``), then NIXL 1.5 as vLLM's NixlConnector drives it on the same job in two fresh processes of its
own. Sizes are interleaved run by run, so a noisy minute hits every figure alike. The table gives medians over runs
with min–max; ratios are per run (ours / limit, ours / NIXL) and then their median. Needs ``nixl-cu12`` (``pip
install nixl-cu12==1.5.1 --no-deps``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 1 << 30


def one_run(tokens: int) -> dict[str, object] | None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.json"
        proc = subprocess.run(
            [sys.executable, "-m", "sage_transport.cli", "migrate", "--tokens", str(tokens), "--compare", "nixl",
             "--json", str(path)],
            capture_output=True, text=True,
        )  # fmt: skip
        if proc.returncode != 0:
            print(f"{tokens}: failed: {proc.stderr[-600:]}", file=sys.stderr)
            return None
        record: dict[str, object] = json.loads(path.read_text())
        return record


def spread(values: list[float], digits: int = 2) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[32768, 65536, 131072])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "migrate_vs_nixl")
    args = parser.parse_args()
    runs: dict[int, list[dict[str, object]]] = {t: [] for t in args.tokens}
    for _ in range(args.runs):
        for tokens in args.tokens:
            record = one_run(tokens)
            if record is not None:
                runs[tokens].append(record)
            print(f"done: {tokens}", file=sys.stderr, flush=True)
    lines = [
        "| tokens | sage GB/s | limit GB/s (in-process copy) | sage / limit | NIXL GB/s | sage / NIXL "
        "| CPU s/GiB sage (sender+receiver) | CPU s/GiB NIXL (both) | peak RSS sender / receiver (× KV) | verified |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for tokens, records in runs.items():
        if not records:
            lines.append(f"| {tokens // 1024}K | failed | | | | | | | | |")
            continue
        kv = float(records[0]["bytes"])  # type: ignore[arg-type]
        sage = [float(r["gbps"]) for r in records]  # type: ignore[arg-type]
        limit = [float(r["copy_gbps"]) for r in records]  # type: ignore[arg-type]
        nixl = [float(r["nixl"]["gbps"]) for r in records]  # type: ignore[index]
        cpu = [sum(r["cpu_seconds_per_gib"].values()) for r in records]  # type: ignore[attr-defined]
        ncpu = [float(r["nixl"]["cpu_seconds_per_gib"]) for r in records]  # type: ignore[index]
        rss_s = [r["peak_rss"]["sender"] / kv for r in records]  # type: ignore[index]
        rss_r = [r["peak_rss"].get("receivers", 0) / kv for r in records]  # type: ignore[attr-defined]
        ok = all(r["verified"] and r["nixl"]["verified"] for r in records)  # type: ignore[index]
        lines.append(
            f"| {tokens // 1024}K | {spread(sage)} | {spread(limit)} | {spread([a / b for a, b in zip(sage, limit)])} "
            f"| {spread(nixl)} | {spread([a / b for a, b in zip(sage, nixl)])} | {spread(cpu, 3)} | {spread(ncpu, 3)} "
            f"| {statistics.median(rss_s):.2f} / {statistics.median(rss_r):.2f} | {ok} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({str(k): v for k, v in runs.items()}, indent=1))
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
