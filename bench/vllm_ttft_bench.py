"""vLLM decode side: what the KV transfer adds to a 32K-token request's time to first token (issue 9).

    .venv-engines/bin/python bench/vllm_ttft_bench.py --runs 5 --out bench/results/vllm_ttft

A prefill worker (``SageKVConnector``, built by vLLM's factory, role ``kv_producer``) runs in a child process with a
Qwen2.5-7B-shaped paged cache (28 layers × K/V, 4 KV heads × 128, block 16, bf16) and serves it; before each run it
drives the request's prefill step through its connector, as vLLM would (the worker learns the request's blocks from
the scheduler's output and saves each layer). This process is the
decode instance: its scheduler connector pairs the prefill's 2,048 blocks with 2,048 shuffled blocks vLLM
"allocated", and its worker connector loads them. The figure is the consumer-side contribution to TTFT: from
``start_load_kv`` to the step whose ``get_finished`` reports the request loaded (loads are asynchronous, so vLLM's
own ``wait_for_layer_load`` never waits; a step polls ``get_finished`` every millisecond here, as a busy engine
would each step). The reference, in the same sitting and between the same processes, is a bare
``KVTransferChannel.pull`` of the same blocks (the connector's own overhead is the difference).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.simplefilter("ignore")

LAYERS, HEADS, HEAD_DIM, BLOCK_SIZE, TOKENS = 28, 4, 128, 16, 32768

PRODUCER = """
import json, sys, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, {root!r})
sys.path.insert(0, {bench!r})
from vllm_ttft_bench import connector, caches, prefill
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
worker = connector("kv_producer", KVConnectorRole.WORKER, {blocks})
scheduler = connector("kv_producer", KVConnectorRole.SCHEDULER, {blocks})
kv = caches({blocks}, fill=True)
worker.register_kv_caches(kv)
print(json.dumps({{"address": worker.get_handshake_metadata().address}}), flush=True)
for line in sys.stdin:  # a request id and its blocks: run its prefill's last step, as vLLM drives the connector
    job = json.loads(line)
    prefill(scheduler, worker, kv, job["request_id"], job["blocks"])
    print(json.dumps({{"done": job["request_id"]}}), flush=True)
worker.shutdown()
"""


def prefill(scheduler: Any, worker: Any, kv: dict[str, Any], request_id: str, blocks: list[int]) -> None:
    """One prefill step of a request a decode will pull (the whole prompt in one chunk): the connector learns its
    blocks from the scheduler's output and saves each layer."""
    from vllm.sampling_params import SamplingParams
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.kv_cache_utils import KVCacheBlock
    from vllm.v1.core.sched.output import NewRequestData, SchedulerOutput
    from vllm.v1.request import Request

    params = {"do_remote_decode": True}
    request = Request(
        request_id, list(range(TOKENS)), SamplingParams(max_tokens=1, extra_args={"kv_transfer_params": params}), None
    )
    scheduler.update_state_after_alloc(request, KVCacheBlocks(([KVCacheBlock(b) for b in blocks],)), 0)
    out = SchedulerOutput.make_empty()
    out.scheduled_new_reqs = [NewRequestData.from_request(request, (list(blocks),))]
    out.num_scheduled_tokens = {request_id: TOKENS}
    worker.bind_connector_metadata(scheduler.build_connector_meta(out))
    worker.start_load_kv(None)
    for name, tensor in kv.items():
        worker.save_kv_layer(name, tensor, None)
    worker.wait_for_save()
    worker.clear_connector_metadata()


def connector(kv_role: str, role: Any, blocks: int) -> Any:
    from vllm.config import KVTransferConfig, VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.v1.kv_cache_interface import KVCacheConfig

    config = VllmConfig(
        kv_transfer_config=KVTransferConfig(
            kv_connector="SageKVConnector", kv_connector_module_path="sage_transport.integrations.vllm", kv_role=kv_role,
            engine_id=f"bench-{kv_role}", kv_connector_extra_config={"sage_config": "preset=high-bw"},
        )
    )  # fmt: skip
    config.cache_config.block_size = BLOCK_SIZE
    return KVConnectorFactory.create_connector(
        config, role, KVCacheConfig(num_blocks=blocks, kv_cache_tensors=[], kv_cache_groups=[])
    )


def caches(blocks: int, fill: bool) -> dict[str, Any]:
    import torch

    out = {}
    for layer in range(LAYERS):
        t = torch.empty(2, blocks, BLOCK_SIZE, HEADS, HEAD_DIM, dtype=torch.bfloat16)
        if fill:
            t.copy_(torch.randn(t.shape, dtype=torch.float32))
        else:
            t.zero_()
        out[f"model.layers.{layer}.self_attn.attn"] = t
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import numpy as np
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.sampling_params import SamplingParams
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.kv_cache_utils import KVCacheBlock
    from vllm.v1.request import Request

    from sage_transport import KVTransferChannel, TransferPlan
    from sage_transport.integrations.loop_thread import shared_loop

    need = TOKENS // BLOCK_SIZE
    blocks = need + 64
    code = PRODUCER.format(root=str(ROOT), bench=str(ROOT / "bench"), blocks=blocks)
    producer = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert producer.stdout is not None and producer.stdin is not None
    address = next(json.loads(line) for line in producer.stdout if line.startswith("{"))["address"]
    scheduler = connector("kv_consumer", KVConnectorRole.SCHEDULER, blocks)
    worker = connector("kv_consumer", KVConnectorRole.WORKER, blocks)
    kv = caches(blocks, fill=False)
    worker.register_kv_caches(kv)
    rng = np.random.default_rng(0)
    prompt = list(range(TOKENS))
    ttft: list[float] = []
    bare: list[float] = []
    for run in range(args.runs):
        remote = (rng.permutation(blocks - 1)[:need] + 1).tolist()  # block 0 is vLLM's null block
        local = (rng.permutation(blocks - 1)[:need] + 1).tolist()
        for request_id in (f"r{run}", f"bare{run}"):  # the prefill ran: its connector knows the request's blocks
            producer.stdin.write(json.dumps({"request_id": request_id, "blocks": remote}) + "\n")
            producer.stdin.flush()
            next(line for line in producer.stdout if line.startswith('{"done"'))
        params = {
            "do_remote_prefill": True,
            "remote_block_ids": remote,
            "remote_address": address,
            "remote_request_id": f"r{run}",
        }
        request = Request(f"d{run}", prompt, SamplingParams(max_tokens=1, extra_args={"kv_transfer_params": params}), None)
        count, _ = scheduler.get_num_new_matched_tokens(request, 0)
        scheduler.update_state_after_alloc(request, KVCacheBlocks(([KVCacheBlock(b) for b in local],)), count)
        worker.bind_connector_metadata(scheduler.build_connector_meta(None))
        start = time.perf_counter()
        worker.start_load_kv(None)
        worker.clear_connector_metadata()
        done: set[str] = set()
        while f"d{run}" not in done:
            _, finished = worker.get_finished(set())
            done |= finished or set()
            time.sleep(0.001)
        ttft.append(time.perf_counter() - start)
        assert worker.get_block_ids_with_load_errors() == set()

        async def pull(run: int = run, remote: list[int] = remote, local: list[int] = local) -> float:
            channel: KVTransferChannel = worker._channel
            peer = next(iter(channel.peers))
            plan = TransferPlan.for_blocks(peer, worker._paged.schema, remote, local, transfer_id=f"bare{run}")
            t = time.perf_counter()
            await channel.pull(plan)
            return time.perf_counter() - t

        bare.append(shared_loop().call(pull()))
        print(f"run {run}: connector {ttft[-1] * 1e3:.1f} ms, bare pull {bare[-1] * 1e3:.1f} ms", flush=True)
    producer.stdin.close()
    producer.wait(30)
    worker.shutdown()
    nbytes = need * LAYERS * 2 * BLOCK_SIZE * HEADS * HEAD_DIM * 2
    result = {
        "tokens": TOKENS, "bytes": nbytes, "runs": args.runs,
        "connector_ms": [round(x * 1e3, 2) for x in ttft], "bare_pull_ms": [round(x * 1e3, 2) for x in bare],
        "connector_ms_median": statistics.median(ttft) * 1e3, "bare_pull_ms_median": statistics.median(bare) * 1e3,
        "connector_gbps_median": nbytes / statistics.median(ttft) / 1e9,
        "connector_over_bare": statistics.median(ttft) / statistics.median(bare),
    }  # fmt: skip
    print(json.dumps(result, indent=2))
    if args.out is not None:
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
