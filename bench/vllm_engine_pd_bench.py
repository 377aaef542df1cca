"""Real vLLM engines, TTFT with and without SageKVConnector (issue 19), on the tiny two-layer Llama.

    .venv-engines/bin/python bench/vllm_engine_pd_bench.py --runs 5 --out bench/results/vllm_engine_pd

Four vLLM 0.32 CPU engines, each a process of its own (``sage_transport.testing.vllm_engine``), built once:
a plain engine (no connector), an engine with the connector loaded serving plain requests (``kv_both``), a prefill
(``kv_producer``) and a decode (``kv_consumer``). For each prompt length, ``--runs`` fresh random prompts (prefix
caching off); only one engine works at a time. Per prompt:

* **colocated**: ``LLM.generate(prompt, max_tokens=1)`` on the plain engine, the wall time of the call;
* **connector loaded**: the same on the ``kv_both`` engine (what having the connector costs a request that does not
  use it);
* **disaggregated**: the prefill's ``generate(max_tokens=1, do_remote_decode)`` then the decode's
  ``generate(max_tokens=1)`` with the prefill's ``kv_transfer_params`` (the proxy's hop itself not counted): the time
  to the decode's first token. Split into the prefill call, the decode call, and the pull inside it (the
  connector's own ``recent_loads``).

Every disaggregated answer is checked against the colocated one (the same first token: the KV moved is right).
Figures are medians with min–max; the machine is shared: read the ratios.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sage_transport.testing.vllm_engine import EngineProcess, write_tiny_llama  # noqa: E402


def summary(values: list[float]) -> dict[str, float]:
    return {"median_ms": round(statistics.median(values) * 1e3, 2), "min_ms": round(min(values) * 1e3, 2),
            "max_ms": round(max(values) * 1e3, 2)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 3072])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/vllm_engine_pd")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sage-vllm-pd-"))
    model = write_tiny_llama(work / "model")
    specs = {"plain": None, "loaded": "kv_both", "prefill": "kv_producer", "decode": "kv_consumer"}
    engines = {name: EngineProcess(model, role, log_path=work / f"{name}.log", wait=False) for name, role in specs.items()}
    try:
        for engine in engines.values():
            engine.wait_ready()
        rng = random.Random(0)
        warm = [rng.randrange(3, 500) for _ in range(64)]
        for engine in engines.values():  # first requests pay one-off costs
            engine.generate([{"id": "warm", "prompt": warm, "max_tokens": 1}])
        held = engines["prefill"].generate(
            [{"id": "warm", "prompt": warm, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}}]
        )
        engines["decode"].generate(
            [{"id": "warm", "prompt": warm, "max_tokens": 1, "kv_transfer_params": held["warm"]["kv_transfer_params"]}]
        )
        rows: list[dict[str, Any]] = []
        for tokens in args.tokens:
            times: dict[str, list[float]] = {k: [] for k in ("colocated", "loaded", "prefill", "decode", "pull", "disaggregated")}
            for run in range(args.runs):
                prompt = [rng.randrange(3, 500) for _ in range(tokens)]
                job = {"id": f"{tokens}-{run}", "prompt": prompt, "max_tokens": 1}
                colocated = engines["plain"].generate([job])[job["id"]]
                times["colocated"].append(colocated["seconds"])
                times["loaded"].append(engines["loaded"].generate([job])[job["id"]]["seconds"])
                prefilled = engines["prefill"].generate([{**job, "kv_transfer_params": {"do_remote_decode": True}}])[job["id"]]
                params = prefilled["kv_transfer_params"]
                decoded = engines["decode"].generate([{**job, "kv_transfer_params": params}])[job["id"]]
                assert decoded["token_ids"] == colocated["token_ids"], (tokens, run, decoded, colocated)
                (rank,) = engines["decode"].ask({"loads": {}})["ranks"]
                (load,) = [x for x in rank["loads"] if x["transfer"] == params["remote_request_id"]]
                times["prefill"].append(prefilled["seconds"])
                times["decode"].append(decoded["seconds"])
                times["pull"].append(load["seconds"])
                times["disaggregated"].append(prefilled["seconds"] + decoded["seconds"])
            row = {"tokens": tokens, "runs": args.runs, "kv_bytes": tokens * 2 * 2 * 2 * 64 * 2}
            row.update({name: summary(values) for name, values in times.items()})
            row["disaggregated_over_colocated"] = round(
                statistics.median(times["disaggregated"]) / statistics.median(times["colocated"]), 2
            )
            row["loaded_over_colocated"] = round(statistics.median(times["loaded"]) / statistics.median(times["colocated"]), 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        for engine in engines.values():
            engine.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"rows": rows, "command": " ".join(sys.argv)}, indent=1) + "\n")
    lines = [
        "| prompt tokens | colocated TTFT ms | connector loaded ms | disaggregated ms (prefill + decode) | pull ms | "
        "disaggregated / colocated | loaded / colocated |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:

        def cell(key: str, r: dict[str, Any] = row) -> str:
            return f"{r[key]['median_ms']} ({r[key]['min_ms']}–{r[key]['max_ms']})"

        lines.append(
            f"| {row['tokens']} | {cell('colocated')} | {cell('loaded')} | {cell('disaggregated')} "
            f"({row['prefill']['median_ms']} + {row['decode']['median_ms']}) | {cell('pull')} | "
            f"{row['disaggregated_over_colocated']} | {row['loaded_over_colocated']} |"
        )
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
