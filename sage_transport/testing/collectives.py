"""The collective checks every backend passes, and runners for them: ranks as tasks of one loop (mock) or as
processes (gloo, nccl), each rank running the same checks in the same order.

    results = run_in_tasks(3)                                   # mock, 3 ranks
    results = run_in_processes("gloo", 3)                       # {check: [error or None per rank]}

Run ``python -m sage_transport.testing.collectives --backend gloo --rank R --world-size W --port P`` for one rank.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from ..collectives import CommBackend, CommFusion, MockCommGroup, ReduceOp, create_comm_backend, free_port
from ..collectives.mock import reduce
from ..errors import CollectiveError, CollectiveTimeoutError, ConfigError, GroupPoisonedError

__all__ = ["COLLECTIVE_CHECKS", "run_in_processes", "run_in_tasks"]

Check = Callable[[CommBackend], Awaitable[None]]


def _device(b: CommBackend) -> Any:
    return getattr(b, "device", "cpu")


async def check_all_reduce_ops(b: CommBackend) -> None:
    import torch

    w, dev = b.world_size, _device(b)
    for op in ReduceOp:
        x = torch.arange(6, dtype=torch.float32, device=dev) + b.rank + 1
        expected = reduce(torch.stack([torch.arange(6, dtype=torch.float32) + r + 1 for r in range(w)]), op, w)
        await b.all_reduce(x, op.value)
        assert torch.allclose(x.cpu(), expected), (op, x, expected)
    for op in (ReduceOp.SUM, ReduceOp.AVG):
        n = torch.tensor([b.rank * 7 + 1, -b.rank], dtype=torch.int64, device=dev)
        expected = reduce(torch.stack([torch.tensor([r * 7 + 1, -r]) for r in range(w)]), op, w)
        await b.all_reduce(n, op)
        assert n.cpu().tolist() == expected.tolist(), (op, n, expected)


async def check_all_gather(b: CommBackend) -> None:
    import torch

    mine = torch.tensor([b.rank, b.rank * 10], dtype=torch.float32, device=_device(b))
    got = await b.all_gather(mine)
    assert tuple(got.shape) == (b.world_size, 2)
    assert got.cpu().tolist() == [[float(r), float(r * 10)] for r in range(b.world_size)], got
    out = torch.zeros((b.world_size, 2), device=_device(b))
    assert await b.all_gather(mine, out=out) is out and out.cpu().tolist() == got.cpu().tolist()
    with _raises(ConfigError, "out (shape (3,)"):
        await b.all_gather(mine, out=torch.zeros(3))


async def check_reduce_scatter(b: CommBackend) -> None:
    import torch

    w = b.world_size
    for op in (ReduceOp.SUM, ReduceOp.AVG, ReduceOp.MAX):
        x = torch.arange(w * 3, dtype=torch.float32, device=_device(b)) * (b.rank + 1)
        full = reduce(torch.stack([torch.arange(w * 3, dtype=torch.float32) * (r + 1) for r in range(w)]), op, w)
        out = torch.zeros(3, device=_device(b))
        got = await b.reduce_scatter(x, op, out=out if op is ReduceOp.MAX else None)
        assert torch.allclose(got.cpu(), full[b.rank * 3 : (b.rank + 1) * 3]), (op, got)
        assert (got is out) is (op is ReduceOp.MAX)


async def check_broadcast(b: CommBackend) -> None:
    import torch

    src = b.world_size - 1
    x = torch.full((5,), float(b.rank), device=_device(b))
    await b.broadcast(x, src)
    assert x.cpu().tolist() == [float(src)] * 5, x


async def check_send_recv_ring(b: CommBackend) -> None:
    import torch

    w = b.world_size
    if w < 2:
        return
    nxt, prev = (b.rank + 1) % w, (b.rank - 1) % w
    out = torch.full((1000,), float(b.rank), device=_device(b))
    into = torch.zeros(1000, device=_device(b))
    await asyncio.gather(b.send(out, nxt, tag=5), b.recv(into, prev, tag=5))
    assert into.cpu().tolist() == [float(prev)] * 1000


async def check_barrier_waits_for_every_rank(b: CommBackend) -> None:
    await asyncio.sleep(0.05 * b.rank)
    start = time.perf_counter()
    await b.barrier()
    if b.rank == 0:
        assert time.perf_counter() - start >= 0.05 * (b.world_size - 1) - 0.02, "the barrier did not wait"


async def check_fused_many_small(b: CommBackend) -> None:
    import torch

    w, dev = b.world_size, _device(b)
    before = b.get_stats().fusion
    specs = [
        (1 + i % 64, torch.float32 if (i // 50) % 2 == 0 else torch.float64, ReduceOp.SUM if i % 3 else ReduceOp.MAX)
        for i in range(300)
    ]
    tensors = [torch.full((n,), float(b.rank + i), dtype=dt, device=dev) for i, (n, dt, _) in enumerate(specs)]
    results = await asyncio.gather(*(b.fused_all_reduce(t, op) for t, (_, _, op) in zip(tensors, specs)))
    for i, (result, (n, dt, op)) in enumerate(zip(results, specs)):
        value = sum(r + i for r in range(w)) if op is ReduceOp.SUM else (w - 1 + i)
        assert result is tensors[i] and result.dtype == dt and result.cpu().tolist() == [float(value)] * n, (i, result)
    after = b.get_stats().fusion
    assert after.hits - before.hits == 300 and 0 < after.buckets - before.buckets < 300, (before, after)


async def check_fused_then_direct_keeps_order(b: CommBackend) -> None:
    import torch

    w, dev = b.world_size, _device(b)
    first = asyncio.ensure_future(b.fused_all_reduce(torch.ones(3, device=dev)))
    second = asyncio.ensure_future(b.fused_all_reduce(torch.full((2,), 2.0, device=dev), "max"))
    await asyncio.sleep(0)
    direct = torch.full((4,), float(b.rank), device=dev)
    await b.all_reduce(direct)
    third = await b.fused_all_reduce(torch.full((1,), 5.0, device=dev))
    assert (await first).cpu().tolist() == [float(w)] * 3
    assert (await second).cpu().tolist() == [2.0, 2.0]
    assert direct.cpu().tolist() == [float(sum(range(w)))] * 4
    assert third.cpu().tolist() == [5.0 * w]


async def check_fused_time_window_flushes_staggered_ranks(b: CommBackend) -> None:
    import torch

    rounds = b.get_stats().fusion.rounds
    await asyncio.sleep(0.03 * b.rank)  # each rank's window fires at a different moment
    got = await b.fused_all_reduce(torch.full((8,), 1.0 + b.rank, device=_device(b)))
    assert got.cpu().tolist() == [float(sum(1 + r for r in range(b.world_size)))] * 8
    assert b.get_stats().fusion.rounds > rounds


async def check_policy_switches_fusion_and_overlap(b: CommBackend) -> None:
    import torch

    dev = b.device if hasattr(b, "device") else "cpu"
    buckets = b.get_stats().fusion.buckets
    b.set_policy(fusion=False)
    got = await b.fused_all_reduce(torch.ones(2, device=dev))
    assert got.cpu().tolist() == [float(b.world_size)] * 2 and b.get_stats().fusion.buckets == buckets
    for limit in (1, 3):
        b.set_policy(fusion=CommFusion(bucket_bytes=64, window_s=0.001), overlap=limit)
        xs = [torch.full((16,), float(i), device=dev) for i in range(8)]
        await asyncio.gather(*(b.all_reduce(x) for x in xs))
        assert [x.cpu()[0].item() for x in xs] == [float(i * b.world_size) for i in range(8)]
        overlap = b.get_stats().overlap
        assert overlap.limit == limit and 1 <= overlap.max_inflight_seen <= limit, overlap
    b.set_policy(fusion=CommFusion(), overlap=4)
    with _raises(ConfigError, "overlap=0"):
        b.set_policy(overlap=0)


async def check_bad_input_is_refused_by_name(b: CommBackend) -> None:
    import torch

    with _raises(ConfigError, "op='median'"):
        await b.all_reduce(torch.ones(2), "median")
    if b.world_size > 1:
        with _raises(ConfigError, "divisible by world_size"):
            await b.reduce_scatter(torch.ones(b.world_size * 2 + 1))
    with _raises(ConfigError, "src=99"):
        await b.broadcast(torch.ones(1), 99)
    if b.world_size > 1:
        with _raises(ConfigError, "this rank"):
            await b.send(torch.ones(1), b.rank)


async def check_deadline_poisons_then_rebuild_recovers(b: CommBackend) -> None:
    import torch

    generation = b.generation
    if b.rank == 0 and b.world_size > 1:
        start = time.perf_counter()
        with _raises(CollectiveTimeoutError, "recv on rank 0"):
            await b.recv(torch.zeros(4), 1, tag=99, timeout_s=0.3)
        assert time.perf_counter() - start < 2.0
        assert b.get_stats().poisoned is not None
        start = time.perf_counter()
        with _raises(GroupPoisonedError, "all_reduce on rank 0"):
            await b.all_reduce(torch.ones(1))
        assert time.perf_counter() - start < 0.05, "a poisoned group must refuse at once"
    else:
        await asyncio.sleep(0.5)
    await b.rebuild()
    x = torch.ones(3, device=_device(b))
    await b.all_reduce(x)
    assert x.cpu().tolist() == [float(b.world_size)] * 3 and b.generation == generation + 1
    assert b.get_stats().poisoned is None


async def check_dead_rank_poisons_survivors_then_rebuild_without_it(b: CommBackend, die: Callable[[], None]) -> None:
    """The last rank dies after a first all-reduce; the others fail within the deadline, are poisoned, and
    rebuild a group of ``world_size - 1`` ranks that works."""
    import torch

    x = torch.ones(2, device=_device(b))
    await b.all_reduce(x)
    victim = b.world_size - 1
    if b.rank == victim:
        die()
        return
    start = time.perf_counter()
    with _raises(CollectiveError, f"all_reduce on rank {b.rank} of {b.world_size}"):
        await b.all_reduce(torch.ones(2, device=_device(b)), timeout_s=2)
    elapsed = time.perf_counter() - start
    assert elapsed < 3, f"the failure took {elapsed:.2f} s"
    with _raises(GroupPoisonedError, f"barrier on rank {b.rank}"):
        await b.barrier()
    await b.rebuild(world_size=b.world_size - 1)
    y = torch.ones(3, device=_device(b))
    await b.all_reduce(y)
    assert y.cpu().tolist() == [float(victim)] * 3 and b.world_size == victim


class _raises:
    def __init__(self, kind: type[BaseException], fragment: str) -> None:
        self.kind, self.fragment = kind, fragment

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> bool:
        if exc is None:
            raise AssertionError(f"expected {self.kind.__name__} mentioning {self.fragment!r}")
        if not isinstance(exc, self.kind) or self.fragment not in str(exc):
            raise AssertionError(f"expected {self.kind.__name__} mentioning {self.fragment!r}, got {exc!r}") from exc
        return True


COLLECTIVE_CHECKS: dict[str, Check] = {
    "all_reduce_ops": check_all_reduce_ops,
    "all_gather": check_all_gather,
    "reduce_scatter": check_reduce_scatter,
    "broadcast": check_broadcast,
    "send_recv_ring": check_send_recv_ring,
    "barrier_waits_for_every_rank": check_barrier_waits_for_every_rank,
    "fused_many_small": check_fused_many_small,
    "fused_then_direct_keeps_order": check_fused_then_direct_keeps_order,
    "fused_time_window_flushes_staggered_ranks": check_fused_time_window_flushes_staggered_ranks,
    "policy_switches_fusion_and_overlap": check_policy_switches_fusion_and_overlap,
    "bad_input_is_refused_by_name": check_bad_input_is_refused_by_name,
    "deadline_poisons_then_rebuild_recovers": check_deadline_poisons_then_rebuild_recovers,
}


#: Checks that kill a rank: they take the backend and the way this rank dies.
FAILURE_CHECKS: dict[str, Callable[[CommBackend, Callable[[], None]], Awaitable[None]]] = {
    "dead_rank": check_dead_rank_poisons_survivors_then_rebuild_without_it,
}


async def _run_checks(
    backend: CommBackend, names: Sequence[str], report: Callable[[str, str | None], None], die: Callable[[], None] | None = None
) -> None:
    for name in names:
        try:
            async with asyncio.timeout(60):
                if name in FAILURE_CHECKS:
                    await FAILURE_CHECKS[name](backend, die or (lambda: os._exit(3)))
                else:
                    await COLLECTIVE_CHECKS[name](backend)
        except Exception as exc:
            if type(exc).__name__ == "_Died":
                report(name, None)
                raise
            report(name, f"{type(exc).__name__}: {exc}")
        else:
            report(name, None)


async def run_in_tasks(world_size: int, names: Sequence[str] | None = None) -> dict[str, list[str | None]]:
    """Every check on a :class:`MockCommGroup`, one task per rank; ``{check: [error or None per rank]}``."""
    names = list(names or COLLECTIVE_CHECKS)
    group = MockCommGroup(world_size)
    results: dict[str, list[str | None]] = {name: [None] * world_size for name in names}

    class _Died(Exception):
        pass

    def die(r: int) -> Callable[[], None]:
        def kill() -> None:
            group.kill(r)
            raise _Died

        return kill

    async def rank(r: int) -> None:
        async with group.backend(r, timeout_s=10) as backend:
            try:
                await _run_checks(backend, names, lambda name, error: results[name].__setitem__(r, error), die(r))
            except _Died:
                pass

    await asyncio.gather(*(rank(r) for r in range(world_size)))
    return results


def run_in_processes(
    backend: str, world_size: int, names: Sequence[str] | None = None, timeout_s: float = 180
) -> dict[str, list[str | None]]:
    """Every check with ``world_size`` rank processes on ``backend``; ``{check: [error or None per rank]}``."""
    names = list(names or COLLECTIVE_CHECKS)
    port = free_port()
    dies = any(name in FAILURE_CHECKS for name in names)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sage_transport.testing.collectives",
                "--backend",
                backend,
                "--rank",
                str(r),
                "--world-size",
                str(world_size),
                "--port",
                str(port),
                "--checks",
                ",".join(names),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        for r in range(world_size)
    ]
    results: dict[str, list[str | None]] = {name: ["no result"] * world_size for name in names}
    deadline = time.monotonic() + timeout_s
    for r, proc in enumerate(procs):
        try:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            out, err = proc.communicate()
            err += "\n(killed: the run passed its deadline)"
        for line in out.splitlines():
            if line.startswith("{"):
                row = json.loads(line)
                results[row["check"]][r] = row["error"]
        for name in names:
            if results[name][r] == "no result":
                if dies and r == world_size - 1 and proc.returncode == 3:
                    results[name][r] = None  # the rank that was meant to die did
                else:
                    results[name][r] = f"no result from rank {r} (exit {proc.returncode}): {err.strip()[-1500:]}"
    return results


async def _rank_main(args: argparse.Namespace) -> None:
    backend = await create_comm_backend(
        args.backend, rank=args.rank, world_size=args.world_size, master_addr="127.0.0.1", master_port=args.port, timeout_s=10
    )
    async with backend:

        def report(name: str, error: str | None) -> None:
            print(json.dumps({"check": name, "error": error}), flush=True)

        await _run_checks(backend, args.checks.split(","), report)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="run the collective checks as one rank")
    parser.add_argument("--backend", required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--checks", default=",".join(COLLECTIVE_CHECKS), help="comma-separated; also: dead_rank")
    asyncio.run(_rank_main(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
