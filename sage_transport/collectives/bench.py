"""``sage-transport bench collectives``: our backend against raw torch.distributed in the same run, and fused
against unfused small all-reduces.

Every rank is a process. Per message size and op, pairs of single ops, one *ours* (``await backend.all_reduce(t)``)
and one *raw* (the same process group driven as ``torch.distributed.all_reduce`` drives it:
``pg.allreduce([t]).wait()``, blocking), each timed alone, the order alternating from pair to pair, for about
``--seconds`` (at least ``--repeats`` pairs). Per-op medians resist the bursts of a shared machine that spoil
batch timings. Reported per op: median, p10–p90 and mean time; the overhead as the ratio of medians (and of
means); ``algbw = bytes / time`` and ``busbw`` by nccl-tests' definitions (all_reduce: algbw × 2(n−1)/n;
all_gather: algbw × (n−1)/n, with bytes the gathered total). Then 1,000 all-reduces of 4 KiB tensors: one at a
time (ours and raw), and through ``fused_all_reduce``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from ..units import parse_size
from .group import COMM_BACKENDS, create_comm_backend, free_port

__all__ = ["DEFAULT_SIZES", "busbw_factor", "run_collectives_bench"]

DEFAULT_SIZES = [4 << 10, 64 << 10, 1 << 20, 4 << 20, 16 << 20]
REPEATS = 20
SECONDS = 2.0


def busbw_factor(op: str, ranks: int) -> float:
    """nccl-tests' bus-bandwidth factor for ``op`` on ``ranks`` ranks."""
    if op == "all_reduce":
        return 2 * (ranks - 1) / ranks
    return (ranks - 1) / ranks


async def _timed(run_once: Callable[[], Awaitable[None]], count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        await run_once()
    return (time.perf_counter() - start) / count


async def _worker(args: argparse.Namespace) -> dict[str, Any] | None:
    import torch

    if args.pin:
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[args.rank % len(cpus)]})  # one CPU per rank: fewer migrations, less noise

    backend = await create_comm_backend(
        args.backend, rank=args.rank, world_size=args.ranks, master_addr="127.0.0.1", master_port=args.port, timeout_s=120
    )
    device = getattr(backend, "device", "cpu")
    pg = backend.pg  # type: ignore[attr-defined]
    n = args.ranks
    rows: list[dict[str, Any]] = []
    async with backend:
        for op in ("all_reduce", "all_gather"):
            for size in args.sizes:
                x = torch.ones(size // 4, dtype=torch.float32, device=device)
                gathered = torch.empty((n, *x.shape), dtype=x.dtype, device=device)
                parts = list(gathered.unbind(0))

                ours, raw = _runners(backend, pg, op, x, gathered, parts, device)

                for _ in range(3):  # warm up
                    await ours()
                    await raw()
                await backend.barrier()
                start = time.perf_counter()
                await ours()
                probe = torch.tensor([time.perf_counter() - start], device=device)
                await backend.all_reduce(probe, "max")  # every rank sizes its run alike
                pairs = max(args.repeats, min(2000, int(args.seconds / 2 / max(float(probe.item()), 1e-6))))
                times: dict[str, list[float]] = {"ours": [], "raw": []}
                for i in range(pairs):
                    # one op of each per pair, alternating which goes first: drift and order bias cancel
                    for name, fn in (("ours", ours), ("raw", raw)) if i % 2 == 0 else (("raw", raw), ("ours", ours)):
                        start = time.perf_counter()
                        await fn()
                        times[name].append(time.perf_counter() - start)
                total = size * (n if op == "all_gather" else 1)
                row: dict[str, Any] = {"op": op, "bytes": size, "ranks": n, "pairs": pairs}
                for name, values in times.items():
                    median = statistics.median(values)
                    ordered = sorted(values)
                    row[name] = {
                        "us_median": median * 1e6, "us_p10": ordered[len(ordered) // 10] * 1e6,
                        "us_p90": ordered[(len(ordered) * 9) // 10] * 1e6, "us_mean": statistics.mean(values) * 1e6,
                        "algbw_gbps": total / median / 1e9, "busbw_gbps": total / median / 1e9 * busbw_factor(op, n),
                    }  # fmt: skip
                row["overhead_pct"] = (row["ours"]["us_median"] / row["raw"]["us_median"] - 1) * 100
                row["overhead_mean_pct"] = (row["ours"]["us_mean"] / row["raw"]["us_mean"] - 1) * 100
                rows.append(row)
        fusion = await _fusion_bench(backend, pg, device, args.fused_count)
        stats = backend.get_stats()
    if args.rank != 0:
        return None
    return {
        "backend": args.backend, "ranks": n, "torch": torch.__version__, "pinned": args.pin, "rows": rows, "fusion": fusion,
        "fusion_stats": {"hits": stats.fusion.hits, "buckets": stats.fusion.buckets, "rounds": stats.fusion.rounds},
    }  # fmt: skip


def _runners(
    backend: Any, pg: Any, op: str, x: Any, gathered: Any, parts: list[Any], device: Any
) -> tuple[Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]]:
    """``ours`` awaits our backend; ``raw`` drives the same process group as torch.distributed does (blocking).
    Both gather into one preallocated output, as an engine does."""
    import torch

    async def ours() -> None:
        if op == "all_reduce":
            await backend.all_reduce(x)
        else:
            await backend.all_gather(x, out=gathered)

    async def raw() -> None:
        work = pg.allreduce([x]) if op == "all_reduce" else pg.allgather([parts], [x])
        work.wait()
        if device != "cpu":
            torch.cuda.synchronize(device)

    return ours, raw


async def _fusion_bench(backend: Any, pg: Any, device: Any, count: int) -> dict[str, Any]:
    import torch

    tensors = [torch.ones(1024, dtype=torch.float32, device=device) for _ in range(count)]
    results: dict[str, list[float]] = {"unfused_ours": [], "unfused_raw": [], "fused": []}
    for _ in range(3):
        await backend.barrier()
        start = time.perf_counter()
        for t in tensors:
            await backend.all_reduce(t)
        results["unfused_ours"].append(time.perf_counter() - start)
        await backend.barrier()
        start = time.perf_counter()
        for t in tensors:
            pg.allreduce([t]).wait()
        if device != "cpu":
            torch.cuda.synchronize(device)
        results["unfused_raw"].append(time.perf_counter() - start)
        await backend.barrier()
        start = time.perf_counter()
        await asyncio.gather(*(backend.fused_all_reduce(t) for t in tensors))
        results["fused"].append(time.perf_counter() - start)
    out: dict[str, Any] = {"tensors": count, "bytes_each": 4096}
    for name, values in results.items():
        out[f"{name}_ms"] = {"median": statistics.median(values) * 1e3, "min": min(values) * 1e3, "max": max(values) * 1e3}
    out["speedup_vs_unfused_ours"] = out["unfused_ours_ms"]["median"] / out["fused_ms"]["median"]
    out["speedup_vs_unfused_raw"] = out["unfused_raw_ms"]["median"] / out["fused_ms"]["median"]
    return out


def run_collectives_bench(
    backend: str, ranks: int, *, sizes: Sequence[int] = DEFAULT_SIZES, repeats: int = REPEATS, fused_count: int = 1000,
    timeout_s: float = 900, pin: bool = False, seconds: float = SECONDS,
) -> dict[str, Any]:  # fmt: skip
    """Run the bench with ``ranks`` processes on ``backend`` (``gloo`` or ``nccl``) and return rank 0's record."""
    if backend not in COMM_BACKENDS or backend == "mock":
        raise ValueError(f"backend={backend!r}: the bench runs gloo or nccl (the mock has no raw torch twin)")
    port = free_port()
    common = ["--backend", backend, "--ranks", str(ranks), "--port", str(port), "--repeats", str(repeats)]
    common += ["--seconds", str(seconds), "--fused-count", str(fused_count), "--sizes", ",".join(map(str, sizes))]
    common += ["--pin"] if pin else []
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "sage_transport.collectives.bench", "--rank", str(r), *common],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "LOCAL_RANK": str(r)},
        )
        for r in range(ranks)
    ]
    outputs = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise RuntimeError(f"the collectives bench passed {timeout_s:g} s") from None
        if proc.returncode != 0:
            for p in procs:
                p.kill()
            raise RuntimeError(f"a bench rank failed (exit {proc.returncode}): {err.strip()[-2000:]}")
        outputs.append(out)
    return json.loads(outputs[0].strip().splitlines()[-1])  # type: ignore[no-any-return]


def markdown(record: dict[str, Any]) -> str:
    lines = [
        f"{record['backend']}, {record['ranks']} ranks, torch {record['torch']}",
        "",
        "| op | bytes | pairs | ours µs median (p10–p90) | raw µs median (p10–p90) "
        "| ours algbw / busbw GB/s | raw algbw / busbw GB/s | overhead: medians / means |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in record["rows"]:
        o, r = row["ours"], row["raw"]
        lines.append(
            f"| {row['op']} | {_size(row['bytes'])} | {row['pairs']} "
            f"| {o['us_median']:.0f} ({o['us_p10']:.0f}–{o['us_p90']:.0f}) "
            f"| {r['us_median']:.0f} ({r['us_p10']:.0f}–{r['us_p90']:.0f}) | {o['algbw_gbps']:.3f} / {o['busbw_gbps']:.3f} "
            f"| {r['algbw_gbps']:.3f} / {r['busbw_gbps']:.3f} | {row['overhead_pct']:+.1f}% / {row['overhead_mean_pct']:+.1f}% |"
        )
    f = record["fusion"]
    lines += [
        "",
        f"{f['tensors']} all-reduces of 4 KiB: one at a time, ours {f['unfused_ours_ms']['median']:.1f} ms "
        f"({f['unfused_ours_ms']['min']:.1f}–{f['unfused_ours_ms']['max']:.1f}); raw {f['unfused_raw_ms']['median']:.1f} ms; "
        f"fused {f['fused_ms']['median']:.1f} ms ({f['fused_ms']['min']:.1f}–{f['fused_ms']['max']:.1f}): "
        f"{f['speedup_vs_unfused_ours']:.1f}× ours unfused, {f['speedup_vs_unfused_raw']:.1f}× raw unfused",
    ]
    return "\n".join(lines) + "\n"


def _size(n: int) -> str:
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="one rank of the collectives bench")
    parser.add_argument("--backend", required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--ranks", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--seconds", type=float, default=SECONDS)
    parser.add_argument("--fused-count", type=int, default=1000)
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)))
    parser.add_argument("--pin", action="store_true", help="pin each rank to one CPU")
    args = parser.parse_args(argv)
    args.sizes = [parse_size(s, "--sizes") for s in args.sizes.split(",")]
    record = asyncio.run(_worker(args))
    if record is not None:
        print(json.dumps(record), flush=True)


def write(record: dict[str, Any], path: Path | None) -> None:
    if path is not None:
        path.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
