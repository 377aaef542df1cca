"""LMDeploy decode side: what ``CacheEngine.migrate`` takes for a 32K-token request through SageMigrationBackend.

    .venv-engines/bin/python bench/lmdeploy_migrate_bench.py --runs 5 --out bench/results/lmdeploy_migrate

A prefill CacheEngine in a child process holds a Qwen2.5-7B-shaped packed pool, as LMDeploy's
``PackedBlockCacheLayout`` builds it: 28 rows × blocks × 128 KiB (64 tokens × 4 KV heads × 128 × K and V × bf16).
This process is the decode engine: LMDeploy's own ``p2p_initialize``/``p2p_connect`` link the two, then
``migrate`` pulls a request's 512 prefill blocks into 512 shuffled decode blocks (LMDeploy builds 14,336 byte
assignments, one per row and block; shuffled blocks leave nothing to coalesce). The reference, in the same sitting
and between the same processes, is a bare ``KVTransferChannel.pull`` of the same pages on the backend's channel:
the difference is the adapter (assignment building, coalescing, mapping) and LMDeploy's own planning.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.simplefilter("ignore")

ROWS, BLOCK_TOKENS, TOKENS = 28, 64, 32768
PAGE = BLOCK_TOKENS * 4 * 128 * 2 * 2
NEED = TOKENS // BLOCK_TOKENS
BLOCKS = NEED + 32

PREFILL = """
import sys, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, {root!r}); sys.path.insert(0, {bench!r})
from lmdeploy_migrate_bench import engine, init_request
from lmdeploy.pytorch.disagg.conn.protocol import DistServeKVTransferEndpointInfo
e = engine(fill=True)
print("ENDPOINT " + e.p2p_initialize(init_request("prefill", "decode")).model_dump_json(), flush=True)
e.p2p_connect("decode", [DistServeKVTransferEndpointInfo.model_validate_json(sys.stdin.readline())])
print("CONNECTED", flush=True)
sys.stdin.readline()
e.migration_backend_impl.close()
"""


def engine(fill: bool) -> Any:
    import torch
    from lmdeploy.pytorch.config import CacheConfig
    from lmdeploy.pytorch.disagg.config import MigrationBackend
    from lmdeploy.pytorch.engine.cache_engine.engine import CacheEngine
    from lmdeploy.pytorch.engine.cache_engine.layout import CacheAllocation, CachePool

    from sage_transport.integrations import lmdeploy as adapter

    e = CacheEngine.__new__(CacheEngine)  # its constructor allocates CUDA caches and streams
    e.rank = e.tp_rank = 0
    e.cache_config = CacheConfig(
        max_batches=4, block_size=BLOCK_TOKENS, num_cpu_blocks=0, num_gpu_blocks=BLOCKS, kernel_block_size=BLOCK_TOKENS,
        device_type="cpu", migration_backend=MigrationBackend[adapter.REGISTERED_AS],
    )  # fmt: skip
    pool = torch.zeros(ROWS, BLOCKS, PAGE, dtype=torch.uint8)
    if fill:
        pool.view(torch.int64).random_()
    e.gpu_allocation = CacheAllocation(pools=(CachePool(pool, 1),), tensor_views=(pool,))
    e.migration_backend_impl = None
    e._pd_cache_pool_infos = None
    e._remote_pd_cache_pool_infos = {}
    return e


def init_request(local: str, remote: str) -> Any:
    from lmdeploy.pytorch.disagg.config import DistServeEngineConfig
    from lmdeploy.pytorch.disagg.conn.protocol import DistServeInitRequest, MigrationProtocol

    config = DistServeEngineConfig(
        tp_size=1, ep_size=1, dp_size=1, pp_size=None, dp_rank=0, block_size=BLOCK_TOKENS, num_cpu_blocks=0,
        num_gpu_blocks=BLOCKS,
    )  # fmt: skip
    return DistServeInitRequest(
        local_engine_id=local, local_engine_config=config, remote_engine_id=remote, remote_engine_config=config,
        protocol=MigrationProtocol.TCP,
    )  # fmt: skip


def tagged(stream: Any, tag: str) -> str:
    return next(line[len(tag) :].strip() for line in stream if line.startswith(tag))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import numpy as np
    from lmdeploy.pytorch.disagg.conn.protocol import DistServeKVTransferEndpointInfo, MigrationProtocol
    from lmdeploy.pytorch.disagg.messages import MigrationExecutionBatch

    from sage_transport import TransferPlan
    from sage_transport.integrations.loop_thread import shared_loop
    from sage_transport.plan import BlockMapping, Priority

    code = PREFILL.format(root=str(ROOT), bench=str(ROOT / "bench"))
    prefill = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert prefill.stdin is not None and prefill.stdout is not None
    prefill_info = DistServeKVTransferEndpointInfo.model_validate_json(tagged(prefill.stdout, "ENDPOINT "))
    decode = engine(fill=False)
    decode_info = decode.p2p_initialize(init_request("decode", "prefill"))
    prefill.stdin.write(decode_info.model_dump_json() + "\n")
    prefill.stdin.flush()
    tagged(prefill.stdout, "CONNECTED")
    decode.p2p_connect("prefill", [prefill_info])
    backend = decode.migration_backend_impl
    pool, link = backend._pools[0], backend.links["prefill"]
    rng = np.random.default_rng(0)
    migrate_s: list[float] = []
    bare_s: list[float] = []
    for run in range(args.runs):
        remote = rng.permutation(BLOCKS)[:NEED].tolist()
        local = rng.permutation(BLOCKS)[:NEED].tolist()
        batch = MigrationExecutionBatch(protocol=MigrationProtocol.TCP, requests=[("prefill", list(zip(remote, local)))])
        start = time.perf_counter()
        asyncio.run(decode.migrate(batch))
        migrate_s.append(time.perf_counter() - start)

        async def pull(remote: list[int] = remote, local: list[int] = local) -> float:
            assert pool.channel is not None and pool.geometry is not None
            plan = TransferPlan(
                transfer_id=uuid.uuid4().hex, peer=link.peers[0], schema=pool.geometry.schema(),
                mappings=(BlockMapping(0, ROWS, tuple(remote), tuple(local)),), priority=Priority.DECODE_CRITICAL,
            )  # fmt: skip
            t = time.perf_counter()
            await pool.channel.pull(plan)
            return time.perf_counter() - t

        bare_s.append(shared_loop().call(pull()))
        print(f"run {run}: migrate {migrate_s[-1] * 1e3:.1f} ms, bare pull {bare_s[-1] * 1e3:.1f} ms", flush=True)
    prefill.stdin.write("done\n")
    prefill.stdin.close()
    prefill.wait(60)
    backend.close()
    nbytes = NEED * ROWS * PAGE
    result = {
        "tokens": TOKENS, "bytes": nbytes, "assignments": NEED * ROWS, "runs": args.runs,
        "migrate_ms": [round(x * 1e3, 2) for x in migrate_s], "bare_pull_ms": [round(x * 1e3, 2) for x in bare_s],
        "migrate_ms_median": statistics.median(migrate_s) * 1e3, "bare_pull_ms_median": statistics.median(bare_s) * 1e3,
        "migrate_gbps_median": nbytes / statistics.median(migrate_s) / 1e9,
        "migrate_over_bare": statistics.median(migrate_s) / statistics.median(bare_s),
    }  # fmt: skip
    print(json.dumps(result, indent=2))
    if args.out is not None:
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
