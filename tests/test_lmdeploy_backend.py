"""SageMigrationBackend against LMDeploy's real CacheEngine: a prefill engine in a child process and a decode engine
here run LMDeploy's own ``p2p_initialize`` / ``p2p_connect`` / ``migrate`` on CPU cache pools (a packed K+V pool and
a scale pool, as LMDeploy's layouts build them), with the backend LMDeploy picks from ``MIGRATION_BACKENDS`` by
name; the decode's pools must then hold the prefill's bytes in the blocks LMDeploy paired. Skipped where LMDeploy
is not installed."""

from __future__ import annotations

import argparse
import asyncio
import pickle
import subprocess
import sys
import warnings
from types import SimpleNamespace
from typing import Any

import pytest

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    pytest.importorskip("lmdeploy", reason="LMDeploy is not installed (see README: engine adapters)")
    torch = pytest.importorskip("torch")
    from lmdeploy.pytorch.config import CacheConfig
    from lmdeploy.pytorch.disagg.backend.backend import MIGRATION_BACKENDS
    from lmdeploy.pytorch.disagg.config import DistServeEngineConfig, MigrationBackend
    from lmdeploy.pytorch.disagg.conn.protocol import DistServeInitRequest, DistServeKVTransferEndpointInfo, MigrationProtocol
    from lmdeploy.pytorch.disagg.messages import AssignmentInstruct, MigrationAssignment, MigrationExecutionBatch
    from lmdeploy.pytorch.engine.cache_engine.engine import CacheEngine
    from lmdeploy.pytorch.engine.cache_engine.layout import CacheAllocation, CachePool
    from lmdeploy.pytorch.engine.engine_loop import EngineLoop
    from lmdeploy.pytorch.engine.request import Response, ResponseType

    from sage_transport.errors import ConfigError
    from sage_transport.integrations import lmdeploy as adapter

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")

LAYERS, BLOCK_SIZE, KV_BYTES, SCALE_BYTES = 4, 16, 2 * 16 * 2 * 64 * 2, 64  # K+V of 16 tokens × 2 heads × 64 × fp16
PREFILL_BLOCKS, DECODE_BLOCKS = 48, 32


def pattern(rows: int, blocks: int, width: int, salt: int) -> torch.Tensor:
    """Every (row, block) page holds its own bytes."""
    r = torch.arange(rows).view(-1, 1, 1)
    b = torch.arange(blocks).view(1, -1, 1)
    i = torch.arange(width).view(1, 1, -1)
    return ((r * 31 + b * 7 + i + salt) % 251).to(torch.uint8)


def make_engine(num_blocks: int, fill: bool) -> CacheEngine:
    """A real CacheEngine on CPU pools (its constructor allocates CUDA caches and streams, so it is skipped)."""
    engine = CacheEngine.__new__(CacheEngine)
    engine.rank = engine.tp_rank = 0
    engine.cache_config = CacheConfig(
        max_batches=4, block_size=BLOCK_SIZE, num_cpu_blocks=0, num_gpu_blocks=num_blocks, kernel_block_size=BLOCK_SIZE,
        device_type="cpu", migration_backend=MigrationBackend[adapter.REGISTERED_AS],
    )  # fmt: skip
    if fill:
        kv, scales = pattern(LAYERS, num_blocks, KV_BYTES, 0), pattern(LAYERS, num_blocks, SCALE_BYTES, 100)
    else:
        kv = torch.zeros(LAYERS, num_blocks, KV_BYTES, dtype=torch.uint8)
        scales = torch.zeros(LAYERS, num_blocks, SCALE_BYTES, dtype=torch.uint8)
    engine.gpu_allocation = CacheAllocation(pools=(CachePool(kv, 1), CachePool(scales, 1)), tensor_views=(kv, scales))
    engine.migration_backend_impl = None
    engine._pd_cache_pool_infos = None
    engine._remote_pd_cache_pool_infos = {}
    return engine


def engine_config(num_blocks: int) -> DistServeEngineConfig:
    return DistServeEngineConfig(
        tp_size=1, ep_size=1, dp_size=1, pp_size=None, dp_rank=0, block_size=BLOCK_SIZE, num_cpu_blocks=0,
        num_gpu_blocks=num_blocks,
    )  # fmt: skip


def init_request(local: str, local_blocks: int, remote: str, remote_blocks: int) -> DistServeInitRequest:
    return DistServeInitRequest(
        local_engine_id=local, local_engine_config=engine_config(local_blocks), remote_engine_id=remote,
        remote_engine_config=engine_config(remote_blocks), protocol=MigrationProtocol.TCP,
    )  # fmt: skip


PREFILL = f"""
import sys, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, {str(__file__.rsplit("/", 2)[0])!r})
from tests.test_lmdeploy_backend import make_engine, init_request, PREFILL_BLOCKS, DECODE_BLOCKS
from lmdeploy.pytorch.disagg.conn.protocol import DistServeKVTransferEndpointInfo
engine = make_engine(PREFILL_BLOCKS, fill=True)
info = engine.p2p_initialize(init_request("prefill", PREFILL_BLOCKS, "decode", DECODE_BLOCKS))
print("ENDPOINT " + info.model_dump_json(), flush=True)
decode_info = DistServeKVTransferEndpointInfo.model_validate_json(sys.stdin.readline())
engine.p2p_connect("decode", [decode_info])
print("CONNECTED", flush=True)
sys.stdin.readline()  # the decode is done: leave
engine.migration_backend_impl.close()
"""


def read_tagged(stream: object, tag: str) -> str:
    for line in stream:  # type: ignore[attr-defined]
        if line.startswith(tag):
            return line[len(tag) :].strip()
    raise AssertionError(f"the prefill process ended before printing {tag!r}")


def test_the_backend_has_a_name_of_its_own_in_lmdeploys_registry_and_cli() -> None:
    assert adapter.REGISTERED_AS == "SageTransport"
    assert MIGRATION_BACKENDS.module_dict["SageTransport"] is adapter.SageMigrationBackend
    assert MigrationBackend["SageTransport"].name == "SageTransport" and MigrationBackend.DLSlime.name == "DLSlime"
    assert pickle.loads(pickle.dumps(MigrationBackend["SageTransport"])) is MigrationBackend["SageTransport"]
    assert MIGRATION_BACKENDS.module_dict.get("DLSlime") is not adapter.SageMigrationBackend  # LMDeploy's own stays
    from lmdeploy.cli.utils import ArgumentHelper

    parser = argparse.ArgumentParser()

    action = ArgumentHelper.migration_backend(parser)
    assert action.choices == ["DLSlime", "Mooncake", "SageTransport"]
    assert parser.parse_args(["--migration-backend", "SageTransport"]).migration_backend == "SageTransport"


def test_the_decode_engine_pulls_the_prefills_pools_into_the_blocks_lmdeploy_paired() -> None:
    prefill = subprocess.Popen([sys.executable, "-c", PREFILL], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    decode = make_engine(DECODE_BLOCKS, fill=False)
    try:
        assert prefill.stdout is not None and prefill.stdin is not None
        prefill_info = DistServeKVTransferEndpointInfo.model_validate_json(read_tagged(prefill.stdout, "ENDPOINT "))
        decode_info = decode.p2p_initialize(init_request("decode", DECODE_BLOCKS, "prefill", PREFILL_BLOCKS))
        assert isinstance(decode.migration_backend_impl, adapter.SageMigrationBackend)
        prefill.stdin.write(decode_info.model_dump_json() + "\n")
        prefill.stdin.flush()
        read_tagged(prefill.stdout, "CONNECTED")
        decode.p2p_connect("prefill", [prefill_info])
        assert decode.migration_backend_impl.links["prefill"].remote_engine_config.num_gpu_blocks == PREFILL_BLOCKS

        # a request's prefill blocks, some contiguous on both sides (coalesced), paired with the decode's blocks
        pairs = [(10, 3), (11, 4), (12, 5), (47, 0), (2, 31), (30, 17)]
        batch = MigrationExecutionBatch(protocol=MigrationProtocol.TCP, requests=[("prefill", pairs)])
        asyncio.run(decode.migrate(batch))

        kv, scales = (pool.tensor for pool in decode.gpu_allocation.pools)
        expected_kv = pattern(LAYERS, PREFILL_BLOCKS, KV_BYTES, 0)
        expected_scales = pattern(LAYERS, PREFILL_BLOCKS, SCALE_BYTES, 100)
        for source, target in pairs:
            assert torch.equal(kv[:, target], expected_kv[:, source]), (source, target)
            assert torch.equal(scales[:, target], expected_scales[:, source]), (source, target)
        untouched = [b for b in range(DECODE_BLOCKS) if b not in {t for _, t in pairs}]
        assert not kv[:, untouched].any() and not scales[:, untouched].any()

        # a second request reuses the connections
        asyncio.run(decode.migrate(MigrationExecutionBatch(protocol=MigrationProtocol.TCP, requests=[("prefill", [(5, 6)])])))
        assert torch.equal(kv[:, 6], expected_kv[:, 5]) and torch.equal(scales[:, 6], expected_scales[:, 5])

        # LMDeploy's migration loop: a request whose migration fails fails alone, the others migrate
        loop = FakeEngineLoop(decode)
        lost, good = migrating(1, "nobody", [(5, 7)]), migrating(2, "prefill", [(6, 8)])
        asyncio.run(loop.run([lost, good]))
        assert torch.equal(kv[:, 8], expected_kv[:, 6])
        assert loop.failed() == {1: "KV migration from engine 'nobody' failed"} and loop.stopped == [1]
        assert sorted(loop.notified) == [("nobody", 101), ("prefill", 102)]  # both prefills may free the blocks

        stray = MigrationAssignment(
            protocol=MigrationProtocol.TCP, remote_engine_id="nobody",
            batch=[AssignmentInstruct(mr_key=0, target_offset=0, source_offset=0, length=KV_BYTES)],
        )  # fmt: skip
        with pytest.raises(ConfigError, match="remote_engine_id='nobody' has no link"):
            asyncio.run(decode.migration_backend_impl.p2p_migrate(stray))
        prefill.stdin.write("done\n")
        prefill.stdin.flush()
        assert prefill.wait(timeout=60) == 0
        # the prefill is gone: our backend's error (not LMDeploy's) fails that request alone, and the loop lives on
        asyncio.run(loop.run([migrating(3, "prefill", [(7, 9)])]))
        assert loop.failed()[3] == "KV migration from engine 'prefill' failed" and loop.stopped == [1, 3]
        assert "nothing answers at 127.0.0.1:" in loop.reasons[3]  # our channel's error, passed on as the cause
    finally:
        if decode.migration_backend_impl is not None:
            decode.migration_backend_impl.close()
        if prefill.poll() is None:
            prefill.kill()
            prefill.wait()
        for pipe in (prefill.stdin, prefill.stdout):
            if pipe is not None:
                pipe.close()


def migrating(session: int, remote: str, pairs: list[tuple[int, int]]) -> SimpleNamespace:
    """A decode sequence LMDeploy's scheduler hands the migration loop: the prefill's blocks, and ours."""
    request = SimpleNamespace(
        is_dummy_prefill=False, remote_block_ids=[p for p, _ in pairs], remote_engine_id=remote,
        remote_session_id=100 + session, protocol=MigrationProtocol.TCP,
    )  # fmt: skip
    resp = Response(type=ResponseType.SUCCESS, sender_id=0, event=None)  # type: ignore[arg-type]
    return SimpleNamespace(
        session_id=session, migration_request=request, resp=resp, num_token_ids=0, decode=[d for _, d in pairs]
    )


class FakeEngineLoop:
    """What LMDeploy's ``EngineLoop._migration_loop_migrate`` reads, around a real CacheEngine; runs the method as
    LMDeploy defines it (with the hook this module installs)."""

    def __init__(self, cache_engine: CacheEngine) -> None:
        self.executor = SimpleNamespace(migrate=cache_engine.migrate)
        self.stopped: list[int] = []
        self.notified: list[tuple[str, int]] = []
        self.resp_queue: asyncio.Queue[dict[int, Any]] = asyncio.Queue()
        self.reasons: dict[int, str] = {}
        loop = self
        self.scheduler = SimpleNamespace(get_block_tables=lambda msgs: [m.decode for m in msgs], stop_session=self.stopped.append)

        class Conn:
            async def zmq_send(self, remote_engine_id: str, remote_session_id: int) -> None:
                loop.notified.append((remote_engine_id, remote_session_id))

        self.engine_conn = Conn()

    async def run(self, msgs: list[Any]) -> None:
        ready = list(msgs)
        self.resp_queue = asyncio.Queue()
        await EngineLoop._migration_loop_migrate(self, ready)
        self.ready = ready

    def failed(self) -> dict[int, str]:
        failures = {}
        while not self.resp_queue.empty():
            for session, out in self.resp_queue.get_nowait().items():
                assert out.finish and out.resp.type is ResponseType.INTERNAL_ENGINE_ERROR
                self.reasons[session] = out.resp.err_msg
                failures[session] = out.resp.err_msg.split(":")[0]
        assert all(m.session_id not in failures for m in self.ready)  # failed requests leave the batch
        return failures


def test_a_name_whose_engine_is_installed_is_not_taken_without_replace(monkeypatch: pytest.MonkeyPatch) -> None:
    taken = adapter.REGISTERED_AS
    assert taken is not None
    try:
        monkeypatch.setattr(adapter, "_installed", lambda module: True)
        assert adapter.register() == "SageTransport"  # our own name: nothing installed is ever replaced
        with pytest.raises(ConfigError, match="is installed and would be replaced"):
            adapter.register("Mooncake")
        assert adapter.register("Mooncake", replace=True) == "Mooncake"
        with pytest.raises(ConfigError, match="'Bogus' is not a MigrationBackend name"):
            adapter.register("Bogus")
    finally:
        monkeypatch.undo()
        import lmdeploy.pytorch.disagg.backend.mooncake as mooncake

        MIGRATION_BACKENDS.register_module("Mooncake", module=mooncake.MooncakeBackend, force=True)
        assert adapter.register(taken) == taken
