"""Collectives: the same checks on the mock (ranks as tasks) and on Gloo (ranks as processes, 2 and 3 of them),
NCCL where a GPU exists, plus the overlap window, fusion policy, rendezvous ports and the bench CLI."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from sage_transport.cli import main  # noqa: E402
from sage_transport.collectives import (  # noqa: E402
    CommFusion,
    MockCommGroup,
    OverlapWindow,
    ReduceOp,
    comm_port,
    create_comm_backend,
)
from sage_transport.errors import ConfigError, UnsupportedError  # noqa: E402
from sage_transport.testing.collectives import COLLECTIVE_CHECKS, run_in_processes, run_in_tasks  # noqa: E402

CHECKS = list(COLLECTIVE_CHECKS)


@pytest.fixture(scope="module")
def mock_results() -> dict[int, dict[str, list[str | None]]]:
    return {w: asyncio.run(run_in_tasks(w, [*CHECKS, "dead_rank"] if w > 2 else CHECKS)) for w in (1, 2, 3)}


@pytest.fixture(scope="module")
def gloo_results() -> dict[int, dict[str, list[str | None]]]:
    return {2: run_in_processes("gloo", 2, CHECKS), 3: run_in_processes("gloo", 3, [*CHECKS, "dead_rank"])}


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("check", CHECKS)
def test_mock_passes_every_collective_check(mock_results: Any, world: int, check: str) -> None:
    assert mock_results[world][check] == [None] * world


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("check", CHECKS)
def test_gloo_passes_every_collective_check(gloo_results: Any, world: int, check: str) -> None:
    assert gloo_results[world][check] == [None] * world


@pytest.mark.parametrize("backend", ["mock", "gloo"])
def test_a_dead_rank_poisons_the_survivors_who_rebuild_without_it(mock_results: Any, gloo_results: Any, backend: str) -> None:
    results = mock_results if backend == "mock" else gloo_results
    assert results[3]["dead_rank"] == [None, None, None]


def _gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.gpu
@pytest.mark.skipif(_gpus() == 0, reason="NCCL needs a CUDA device")
def test_nccl_passes_every_collective_check() -> None:
    world = min(2, _gpus())
    results = run_in_processes("nccl", world, CHECKS)
    assert {name: errors for name, errors in results.items() if any(errors)} == {}


@pytest.mark.skipif(_gpus() > 0, reason="only where no GPU exists")
async def test_nccl_without_a_gpu_is_refused_clearly() -> None:
    from sage_transport.collectives.nccl import NcclBackend

    with pytest.raises(UnsupportedError, match="needs a CUDA device"):
        NcclBackend(0, 1, store=None)


# ---- overlap window, fusion policy, backends by name, ports -----------------------------------------------


async def test_overlap_window_admits_in_call_order_and_follows_its_limit() -> None:
    window = OverlapWindow(1)
    order: list[int] = []
    release = asyncio.Event()

    async def op(i: int) -> None:
        async with window:
            order.append(i)
            await release.wait()

    tasks = [asyncio.create_task(op(i)) for i in range(5)]
    await asyncio.sleep(0.01)
    assert order == [0] and window.statistics().inflight == 1
    window.set_limit(3)
    await asyncio.sleep(0.01)
    assert order == [0, 1, 2] and window.statistics().max_inflight_seen == 3
    tasks[4].cancel()  # a waiter that gives up leaves its place without taking a slot
    release.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert order == [0, 1, 2, 3] and window.statistics().inflight == 0
    with pytest.raises(ConfigError, match="overlap=0"):
        OverlapWindow(0)


def test_fusion_policy_and_reduce_ops_are_validated_by_name() -> None:
    with pytest.raises(ConfigError, match="bucket_bytes=0"):
        CommFusion(bucket_bytes=0)
    with pytest.raises(ConfigError, match="window_s=-1"):
        CommFusion(window_s=-1)
    assert ReduceOp.parse("AVG") is ReduceOp.AVG
    with pytest.raises(ConfigError, match="op='mean'"):
        ReduceOp.parse("mean")


async def test_backends_by_name_and_env_rendezvous_errors() -> None:
    with pytest.raises(ConfigError, match="backend='mpi'"):
        await create_comm_backend("mpi")
    with pytest.raises(ConfigError, match="needs group="):
        await create_comm_backend("mock")
    async with await create_comm_backend("mock", rank=1, group=MockCommGroup(2)) as backend:
        assert (backend.rank, backend.world_size, backend.name) == (1, 2, "mock")
    with pytest.raises(ConfigError, match="RANK is not set"):
        await create_comm_backend("gloo", env={})
    with pytest.raises(ConfigError, match="no rendezvous port"):
        await create_comm_backend("gloo", env={"RANK": "0", "WORLD_SIZE": "1"})


def test_ports_come_from_our_variable_then_master_port_then_a_free_one() -> None:
    assert comm_port({"SAGE_TRANSPORT_COMM_PORT": "29511", "MASTER_PORT": "29500"}) == 29511
    assert comm_port({"MASTER_PORT": "29500"}) == 29500
    assert 1024 <= comm_port({}) <= 65535
    with pytest.raises(ConfigError, match="MASTER_PORT='http'"):
        comm_port({"MASTER_PORT": "http"})
    with pytest.raises(ConfigError, match="SAGE_TRANSPORT_COMM_PORT='70000'"):
        comm_port({"SAGE_TRANSPORT_COMM_PORT": "70000"})


async def test_gloo_through_env_rendezvous_in_one_process() -> None:
    port = comm_port({})
    env = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    async with await create_comm_backend("gloo", env=env, timeout_s=10) as backend:
        x = torch.arange(4.0)
        await backend.all_reduce(x, "avg")
        assert x.tolist() == [0.0, 1.0, 2.0, 3.0]
        stats = backend.get_stats()
        assert stats.ops == {"all_reduce": 1} and stats.bytes == {"all_reduce": 16} and stats.poisoned is None


def test_bench_collectives_cli_writes_a_record(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "c.json"
    code = main(["bench", "collectives", "--backend", "gloo", "--ranks", "2", "--sizes", "4KiB,64KiB", "--repeats", "5",
                 "--seconds", "0.2", "--fused-count", "50", "--json", str(out)])  # fmt: skip
    assert code == 0
    record = json.loads(out.read_text())
    assert record["backend"] == "gloo" and record["ranks"] == 2
    assert [(r["op"], r["bytes"]) for r in record["rows"]] == [
        ("all_reduce", 4096), ("all_reduce", 65536), ("all_gather", 4096), ("all_gather", 65536)
    ]  # fmt: skip
    for row in record["rows"]:
        assert row["pairs"] >= 5
        for side in ("ours", "raw"):
            assert row[side]["algbw_gbps"] > 0 and row[side]["busbw_gbps"] > 0
            assert row[side]["us_p10"] <= row[side]["us_median"] <= row[side]["us_p90"]
        factor = 1.0 if row["op"] == "all_reduce" else 0.5  # 2(n-1)/n and (n-1)/n for n = 2
        assert row["ours"]["busbw_gbps"] == pytest.approx(row["ours"]["algbw_gbps"] * factor)
    assert record["fusion"]["tensors"] == 50 and record["fusion"]["fused_ms"]["median"] > 0
    assert record["fusion_stats"]["hits"] >= 150  # 3 fused runs of 50
    assert "overhead" in capsys.readouterr().out
    assert main(["bench", "collectives", "--ranks", "0"]) == 2
