"""The in-process mock: every rank is a task of one event loop sharing a :class:`MockCommGroup`.

It is a real backend for tests and for engines' unit tests: collectives match by call order per rank, a rank
that calls a different op at the same step fails every rank with a message naming both, ``kill(rank)`` makes a
rank die (its pending and future peers fail), and it passes the same collective checks as Gloo.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..errors import CollectiveError, ConfigError
from ..telemetry.core import Telemetry
from .base import CommBackend, ReduceOp
from .fusion import CommFusion

__all__ = ["MockCommBackend", "MockCommGroup"]


@dataclass
class _Step:
    calls: dict[int, tuple[str, Any, Any, asyncio.Future[Any]]] = field(default_factory=dict)


class MockCommGroup:
    """``world_size`` ranks in one process. ``backend(rank)`` gives rank ``rank`` its backend."""

    def __init__(self, world_size: int) -> None:
        if world_size < 1:
            raise ConfigError(f"world_size={world_size!r} must be positive")
        self.world_size = world_size
        self._steps: dict[int, _Step] = {}
        self._next_step = [0] * world_size
        self._mail: dict[tuple[int, int, int], collections.deque[Any]] = collections.defaultdict(collections.deque)
        self._waiting_recv: dict[tuple[int, int, int], collections.deque[tuple[Any, asyncio.Future[Any]]]] = (
            collections.defaultdict(collections.deque)
        )
        self._dead: set[int] = set()
        self._successors: dict[tuple[int, int], MockCommGroup] = {}

    def backend(self, rank: int, **options: Any) -> MockCommBackend:
        return MockCommBackend(self, rank, **options)

    def kill(self, rank: int) -> None:
        """Rank ``rank`` dies: every collective it has not joined, and every later one, fails."""
        self._dead.add(rank)
        error = CollectiveError(f"rank {rank} died")
        for step in self._steps.values():
            for _, _, _, future in step.calls.values():
                if not future.done():
                    future.set_exception(error)
        for queue in self._waiting_recv.values():
            for _, future in queue:
                if not future.done():
                    future.set_exception(error)

    def successor(self, generation: int, world_size: int) -> MockCommGroup:
        """The group every rank of a rebuild joins (one per generation and size)."""
        return self._successors.setdefault((generation, world_size), MockCommGroup(world_size))

    # ---- matching --------------------------------------------------------------------------------------

    def join(self, rank: int, op: str, tensor: Any, arg: Any) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self._dead:
            future.set_exception(CollectiveError(f"{op}: rank {min(self._dead)} died"))
            return future
        index = self._next_step[rank]
        self._next_step[rank] += 1
        step = self._steps.setdefault(index, _Step())
        step.calls[rank] = (op, tensor, arg, future)
        if len(step.calls) == self.world_size:
            del self._steps[index]
            self._complete(step)
        return future

    def _complete(self, step: _Step) -> None:
        import torch

        names = {rank: call[0] for rank, call in step.calls.items()}
        if len(set(names.values())) > 1:
            listing = ", ".join(f"rank {r} called {n}" for r, n in sorted(names.items()))
            error = CollectiveError(f"the ranks disagree on the collective at this step: {listing}")
            for _, _, _, future in step.calls.values():
                future.set_exception(error)
            return
        op = next(iter(names.values()))
        ranks = sorted(step.calls)
        tensors = [step.calls[r][1] for r in ranks]
        try:
            if op == "barrier":
                results: list[Any] = [None] * len(ranks)
            elif op == "broadcast":
                src = step.calls[0][2]
                results = [tensors[src].clone() for _ in ranks]
            elif op == "all_gather":
                stacked = torch.stack(tensors)
                results = [stacked.clone() for _ in ranks]
            else:  # all_reduce, fusion_agree, reduce_scatter
                reduced = reduce(torch.stack(tensors), step.calls[0][2], len(ranks))
                if op == "reduce_scatter":
                    results = list(reduced.chunk(len(ranks)))
                else:
                    results = [reduced for _ in ranks]
        except Exception as exc:
            error = CollectiveError(f"{op} failed: {exc}")
            for _, _, _, future in step.calls.values():
                future.set_exception(error)
            return
        for rank, result in zip(ranks, results):
            future = step.calls[rank][3]
            if not future.done():
                future.set_result(result)

    def post(self, src: int, dst: int, tag: int, tensor: Any) -> None:
        key = (src, dst, tag)
        waiting = self._waiting_recv[key]
        while waiting:
            target, future = waiting.popleft()
            if not future.done():
                target.copy_(tensor)
                future.set_result(target)
                return
        self._mail[key].append(tensor.clone())

    def fetch(self, src: int, dst: int, tag: int, target: Any) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        key = (src, dst, tag)
        if self._mail[key]:
            target.copy_(self._mail[key].popleft())
            future.set_result(target)
        elif src in self._dead:
            future.set_exception(CollectiveError(f"recv: rank {src} died"))
        else:
            self._waiting_recv[key].append((target, future))
        return future


def reduce(stacked: Any, op: ReduceOp, world_size: int) -> Any:
    """Reduce along the first dimension (used by the mock and to check real backends)."""
    import torch

    if op is ReduceOp.SUM:
        return stacked.sum(0)
    if op is ReduceOp.MAX:
        return stacked.max(0).values
    if op is ReduceOp.MIN:
        return stacked.min(0).values
    if op is ReduceOp.PRODUCT:
        return stacked.prod(0)
    total = stacked.sum(0)
    if total.is_floating_point():
        return total / world_size
    return torch.div(total, world_size, rounding_mode="floor")


class MockCommBackend(CommBackend):
    """One rank of a :class:`MockCommGroup`."""

    name: ClassVar[str] = "mock"

    def __init__(self, group: MockCommGroup, rank: int, *, timeout_s: float = 30.0, fusion: CommFusion | None = None,
                 overlap: int = 4, telemetry: Telemetry | None = None) -> None:  # fmt: skip
        super().__init__(rank, group.world_size, timeout_s=timeout_s, fusion=fusion, overlap=overlap, telemetry=telemetry)
        self.group = group

    async def _do_all_reduce(self, tensor: Any, op: ReduceOp) -> Any:
        result = await self.group.join(self.rank, "all_reduce", tensor.clone(), op)
        tensor.copy_(result)
        return tensor

    async def _do_all_gather(self, tensor: Any, out: Any) -> Any:
        result = await self.group.join(self.rank, "all_gather", tensor.clone(), None)
        return result if out is None else out.copy_(result)

    async def _do_reduce_scatter(self, tensor: Any, op: ReduceOp, out: Any) -> Any:
        result = await self.group.join(self.rank, "reduce_scatter", tensor.clone(), op)
        return result.clone() if out is None else out.copy_(result)

    async def _do_broadcast(self, tensor: Any, src: int) -> Any:
        result = await self.group.join(self.rank, "broadcast", tensor.clone(), src)
        tensor.copy_(result)
        return tensor

    async def _do_send(self, tensor: Any, dst: int, tag: int) -> None:
        if dst in self.group._dead:
            raise CollectiveError(f"send: rank {dst} died")
        self.group.post(self.rank, dst, tag, tensor)

    async def _do_recv(self, tensor: Any, src: int, tag: int) -> Any:
        return await self.group.fetch(src, self.rank, tag, tensor)

    async def _do_barrier(self) -> None:
        await self.group.join(self.rank, "barrier", None, None)

    def _abort(self) -> None:
        self.group.kill(self.rank)

    async def _rebuild(self, rank: int, world_size: int) -> None:
        self.group = self.group.successor(self.generation, world_size)

    async def _close(self) -> None:
        return None
