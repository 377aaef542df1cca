"""``sage-transport bench pd``: the request mix through each variant (same arrivals), then each long context length
with requests arriving together (its throughput), and the report."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from ..config import KVTransportConfig
from .decode import VARIANTS, run_in_process
from .report import markdown, plot, summarise, targets
from .timing import ComputeModel
from .workload import DEFAULT_LENGTHS, poisson_mix, saturating

__all__ = ["run_pd_bench"]


async def _run(
    variants: list[str], model: str, requests: int, rate: float, output_tokens: int, lengths: dict[int, int],
    saturate: list[int], saturate_count: int, seed: int, scale: float, bulk_mib: int, bulk_gbps: float, decodes: int,
    config: KVTransportConfig,
    progress: Any,
) -> dict[str, Any]:  # fmt: skip
    mix = poisson_mix(requests, rate, output_tokens, lengths=lengths, seed=seed)
    record: dict[str, Any] = {
        "model": model, "compute": ComputeModel.for_model(model, scale).describe(),
        "variants": {v: VARIANTS[v] for v in variants},
        "mix": f"{requests} requests, Poisson {rate}/s, prompts {sorted(lengths)} weighted {list(lengths.values())}, "
        f"{output_tokens} output tokens, a bulk stream of {bulk_mib} MiB transfers offering {bulk_gbps} GB/s, "
        f"{decodes} decode instance(s)",
        "mix_runs": [], "saturating": {}, "raw": {},
    }  # fmt: skip

    async def one(name: str, variant: str, batch: list[Any]) -> dict[str, Any]:
        progress(f"{name}, variant {variant}")
        run = await asyncio.to_thread(
            run_in_process, variant, batch, model=model, config=config, seed=seed, scale=scale, bulk_mib=bulk_mib,
            bulk_gbps=bulk_gbps, decodes=decodes,
        )  # fmt: skip
        record["raw"][f"{name.split()[0]}-{variant}"] = run
        return summarise(run)

    for variant in variants:
        record["mix_runs"].append(await one("mix", variant, mix))
    for tokens in saturate:
        bucket = f"{tokens // 1024}K"
        batch = saturating(tokens, saturate_count, output_tokens)
        for variant in variants:
            record["saturating"].setdefault(bucket, []).append(await one(f"{bucket} together", variant, batch))
    record["targets"] = targets(record)
    for summary in record["mix_runs"]:  # the record keys issue 10 names, per variant
        record[f"{summary['variant']}_ttft_p50_ms"] = summary["ttft_p50_ms"]
        record[f"{summary['variant']}_tpot_p99_ms"] = summary["tpot_p99_ms"]
        record[f"{summary['variant']}_tokens_per_s"] = summary["tokens_per_s"]
    return record


def run_pd_bench(
    *, variants: list[str], model: str = "qwen2.5-7b", requests: int = 12, rate: float = 1.0, output_tokens: int = 64,
    lengths: dict[int, int] | None = None, saturate: list[int] | None = None, saturate_count: int = 3, seed: int = 0,
    scale: float = 1.0, bulk_mib: int = 64, bulk_gbps: float = 0.5, decodes: int = 1,
    config: KVTransportConfig | None = None,
    json_path: Path | None = None,
    md_path: Path | None = None, png_path: Path | None = None, progress: Any = None,
) -> dict[str, Any]:  # fmt: skip
    """Run the bench; writes JSON / Markdown / PNG where paths are given and returns the record."""
    started = time.time()
    record = asyncio.run(
        _run(
            variants, model, requests, rate, output_tokens, lengths or DEFAULT_LENGTHS,
            saturate if saturate is not None else [32768, 65536, 131072], saturate_count, seed, scale, bulk_mib,
            bulk_gbps, decodes,
            config or KVTransportConfig(), progress or (lambda _: None),
        )
    )  # fmt: skip
    record["wall_s"] = time.time() - started
    if json_path is not None:
        json_path.write_text(json.dumps(record, indent=1) + "\n")
    if md_path is not None:
        md_path.write_text(markdown(record))
    if png_path is not None:
        record["png"] = plot(record, png_path)
    return record
