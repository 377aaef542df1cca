"""Encode and decode throughput of every wire codec, in GB/s of bf16 KV, on the CPU (one and all cores) and on a
CUDA GPU when there is one. The figure is the median of ``--runs`` timings of one ``--mib`` MiB chunk.

    .venv/bin/python bench/codec_speed.py --runs 7 --out bench/results/codec_speed
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from sage_transport.codec import CodecSpec, decode, encode, encoded_nbytes  # noqa: E402
from sage_transport.schema import DType  # noqa: E402

WIRE = [DType.FP8_E4M3, DType.FP8_E5M2, DType.INT8, DType.INT4]


def timed(fn: Any, runs: int, sync: Any) -> list[float]:
    fn()
    sync()
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - start)
    return out


def measure(device: str, threads: int | None, mib: int, runs: int) -> dict[str, Any]:
    if threads is not None:
        torch.set_num_threads(threads)
    n = (mib << 20) // 2
    x = (torch.randn(n, generator=torch.Generator().manual_seed(0)) * 0.5).to(torch.bfloat16).to(device)
    y = torch.empty_like(x)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows: dict[str, Any] = {}
    for dtype in WIRE:
        spec = CodecSpec(dtype)
        buf = torch.empty(encoded_nbytes(n, spec), dtype=torch.uint8, device=device)
        enc = timed(lambda s=spec, b=buf: encode(x, s, b), runs, sync)
        dec = timed(lambda s=spec, b=buf: decode(b, s, y), runs, sync)
        rows[dtype.value] = {
            "encode_gbps": x.nbytes / statistics.median(enc) / 1e9,
            "encode_gbps_spread": [x.nbytes / max(enc) / 1e9, x.nbytes / min(enc) / 1e9],
            "decode_gbps": x.nbytes / statistics.median(dec) / 1e9,
            "decode_gbps_spread": [x.nbytes / max(dec) / 1e9, x.nbytes / min(dec) / 1e9],
            "wire_ratio": buf.numel() / x.nbytes,
        }
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--mib", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    result: dict[str, Any] = {"mib": args.mib, "runs": args.runs, "cpu_threads": torch.get_num_threads()}
    result["cpu_1_thread"] = measure("cpu", 1, args.mib, args.runs)
    result["cpu_all_threads"] = measure("cpu", result["cpu_threads"], args.mib, args.runs)
    if torch.cuda.is_available():
        result["cuda"] = measure("cuda", None, max(args.mib, 256), args.runs)
        result["cuda_device"] = torch.cuda.get_device_name()
    for key in ("cpu_1_thread", "cpu_all_threads", "cuda"):
        for dtype, row in result.get(key, {}).items():
            print(f"{key:>16} {dtype:>9}: encode {row['encode_gbps']:8.2f} GB/s  decode {row['decode_gbps']:8.2f} GB/s")
    if args.out is not None:
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
