"""``CommFusion``: bucket small all-reduces into one flat buffer (sageLLM's ``comm_fusion`` knob).

A bucket closes when its tensors reach ``bucket_bytes``, when ``max_tensors`` are waiting, when the oldest has
waited ``window_s``, when any other collective is called, or on ``flush()``. A time window fires at a different
moment on every rank, so every flush is a *round* that cannot go wrong: the ranks first agree (a one-integer MIN
all-reduce) on how many waiting tensors all of them have, then all-reduce exactly that many, as one flat buffer
per run of tensors with the same op and dtype, and unpack the results in place. Collectives are issued in call
order, and a rank starts a round only with tensors waiting, so every rank runs the same rounds in the same order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from ..errors import ConfigError

__all__ = ["CommFusion", "FusionEngine", "FusionStatistics"]


class CommFusion(msgspec.Struct, frozen=True, kw_only=True):
    """Fusion policy. ``enabled=False`` sends every ``fused_all_reduce`` on its own."""

    enabled: bool = True
    bucket_bytes: int = 1 << 20
    window_s: float = 0.0005
    max_tensors: int = 4096

    def __post_init__(self) -> None:
        if isinstance(self.bucket_bytes, bool) or not isinstance(self.bucket_bytes, int) or self.bucket_bytes < 1:
            raise ConfigError(f"bucket_bytes={self.bucket_bytes!r} must be a positive number of bytes")
        if isinstance(self.window_s, bool) or not isinstance(self.window_s, (int, float)) or self.window_s < 0:
            raise ConfigError(f"window_s={self.window_s!r} must be a non-negative number of seconds")
        if isinstance(self.max_tensors, bool) or not isinstance(self.max_tensors, int) or self.max_tensors < 1:
            raise ConfigError(f"max_tensors={self.max_tensors!r} must be a positive integer")


class FusionStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """Tensors that went through a fused bucket (``hits``), buckets (one flat all-reduce each), rounds (one
    agreement each), and tensors waiting now."""

    hits: int
    buckets: int
    rounds: int
    pending: int


@dataclass
class _Waiting:
    tensor: Any
    op: Any
    future: asyncio.Future[Any]
    nbytes: int


#: Issues one collective on the backend without flushing first: (name, tensor, op) → awaitable.
IssueFn = Callable[[str, Any, Any], Awaitable[Any]]


class FusionEngine:
    """The waiting tensors of one backend and the rounds that flush them (see the module docstring)."""

    def __init__(self, issue: IssueFn, policy: CommFusion, min_op: Any) -> None:
        self._issue = issue
        self.policy = policy
        self._min_op = min_op
        self._pending: list[_Waiting] = []
        self._pending_bytes = 0
        self._lock = asyncio.Lock()
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._hits = self._buckets = self._rounds = 0

    def submit(self, tensor: Any, op: Any) -> asyncio.Future[Any]:
        """Queue ``tensor`` for a fused all-reduce; the future resolves to it, reduced in place."""
        loop = asyncio.get_running_loop()
        waiting = _Waiting(tensor, op, loop.create_future(), tensor.numel() * tensor.element_size())
        self._pending.append(waiting)
        self._pending_bytes += waiting.nbytes
        if self._pending_bytes >= self.policy.bucket_bytes or len(self._pending) >= self.policy.max_tensors:
            self._start_flush()
        elif self._timer is None:
            self._timer = loop.call_later(self.policy.window_s, self._start_flush)
        return waiting.future

    async def flush(self) -> None:
        """Run rounds until nothing waits (before any other collective, and on demand)."""
        while self._pending:
            async with self._lock:
                if self._pending:
                    await self._round()

    def fail(self, exc: BaseException) -> None:
        """Fail every waiting tensor (the group is poisoned)."""
        self._cancel_timer()
        for waiting in self._pending:
            if not waiting.future.done():
                waiting.future.set_exception(exc)
                waiting.future.exception()
        self._pending.clear()
        self._pending_bytes = 0

    async def aclose(self) -> None:
        self._cancel_timer()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    @property
    def pending(self) -> int:
        """Tensors waiting for a round."""
        return len(self._pending)

    def statistics(self) -> FusionStatistics:
        return FusionStatistics(hits=self._hits, buckets=self._buckets, rounds=self._rounds, pending=len(self._pending))

    # ---- internals -------------------------------------------------------------------------------------

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _start_flush(self) -> None:
        self._cancel_timer()
        task = asyncio.get_running_loop().create_task(self._flush_quietly(), name="sage-comm-fusion")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _flush_quietly(self) -> None:
        try:
            await self.flush()
        except Exception:  # the waiting futures already carry the error; the group is poisoned
            pass

    async def _round(self) -> None:
        import torch

        self._cancel_timer()
        count = torch.tensor([len(self._pending)], dtype=torch.int64, device=self._pending[0].tensor.device)
        try:
            await self._issue("fusion_agree", count, self._min_op)
        except BaseException as exc:
            self.fail(exc)
            raise
        n = int(count.item())
        self._rounds += 1
        taken, self._pending = self._pending[:n], self._pending[n:]
        self._pending_bytes -= sum(w.nbytes for w in taken)
        if self._pending and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.policy.window_s, self._start_flush)
        start = 0
        while start < len(taken):
            key = _key(taken[start])
            stop = start + 1
            while stop < len(taken) and _key(taken[stop]) == key:
                stop += 1
            await self._bucket(taken[start:stop], taken[stop:])
            start = stop

    async def _bucket(self, run: list[_Waiting], rest: list[_Waiting]) -> None:
        import torch

        flat = torch.cat([w.tensor.reshape(-1) for w in run]) if len(run) > 1 else run[0].tensor.reshape(-1).clone()
        try:
            await self._issue("all_reduce", flat, run[0].op)
        except BaseException as exc:
            for waiting in (*run, *rest):
                if not waiting.future.done():
                    waiting.future.set_exception(exc)
                    waiting.future.exception()
            self.fail(exc)
            raise
        self._buckets += 1
        self._hits += len(run)
        offset = 0
        for waiting in run:
            numel = waiting.tensor.numel()
            waiting.tensor.copy_(flat[offset : offset + numel].view_as(waiting.tensor))
            offset += numel
            if not waiting.future.done():
                waiting.future.set_result(waiting.tensor)


def _key(waiting: _Waiting) -> tuple[Any, Any, Any]:
    return (waiting.op, waiting.tensor.dtype, waiting.tensor.device)
