"""Main-job bench over the mock transport, as a ratio against an in-process reference in the same sitting.

    .venv/bin/python bench/migrate_bench.py [--tokens 32768] [--repeat 5] [--json PATH]

Reference: numpy copying the same pages to the same shuffled destination blocks in one process (one
memory pass, no checksum, no protocol). The mock migration does the work a real receiver does (checksum on
both sides, gather and scatter through staging for non-contiguous runs, headers, acks), so the ratio is the
cost of the channel's data path itself, not of any wire.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import numpy as np

from sage_transport import KVCacheSchema, KVTransportConfig
from sage_transport.migrate import run_migration


def reference_seconds(schema: KVCacheSchema, blocks: int, repeat: int) -> list[float]:
    src = np.ones((schema.num_layers, schema.kv_planes, blocks, schema.page_bytes), dtype=np.uint8)
    dst = np.zeros_like(src)
    perm = np.random.default_rng(0).permutation(blocks)
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        for layer in range(schema.num_layers):
            dst[layer][:, perm] = src[layer]
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--model", default="qwen2.5-7b")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    schema = KVCacheSchema.for_model(args.model)
    blocks = schema.blocks_for_tokens(args.tokens)
    nbytes = blocks * schema.bytes_per_block
    ref = reference_seconds(schema, blocks, args.repeat)
    rows = {"reference shuffled numpy copy": ref}
    for label, spec in (("mock, default (4 MiB, gather, xxh3)", ""), ("mock, high-bw preset", "preset=high-bw"),
                        ("mock, integrity=none", "integrity=none")):  # fmt: skip
        config = KVTransportConfig.resolve(spec or None, env={})
        record = asyncio.run(run_migration(model=args.model, tokens=args.tokens, config=config, repeats=args.repeat))
        assert record.verified
        rows[label] = record.seconds_all
    ref_med = statistics.median(ref)
    print(f"{args.model}, {args.tokens} tokens, {nbytes / 2**30:.2f} GiB, shuffled destination, {args.repeat} runs each")
    print(f"{'what':<40}{'GB/s median':>12}{'min':>7}{'max':>7}{'ratio to reference':>20}")
    result = {}
    for label, secs in rows.items():
        med = statistics.median(secs)
        result[label] = {
            "gbps_median": nbytes / med / 1e9,
            "gbps_min": nbytes / max(secs) / 1e9,
            "gbps_max": nbytes / min(secs) / 1e9,
            "ratio": ref_med / med,
        }
        r = result[label]
        print(f"{label:<40}{r['gbps_median']:>12.2f}{r['gbps_min']:>7.2f}{r['gbps_max']:>7.2f}{r['ratio']:>20.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
