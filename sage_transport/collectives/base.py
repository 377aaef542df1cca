"""``CommBackend``: one async interface to collectives, whatever runs them (Gloo, NCCL, the in-process mock).

Every call has a deadline (``timeout_s``, default the backend's). Ops are issued in call order through an
:class:`~sage_transport.collectives.overlap.OverlapWindow`; ``fused_all_reduce`` goes through
:class:`~sage_transport.collectives.fusion.CommFusion`, and any other op flushes it first, so every rank issues
the same collectives in the same order.

Failure: a deadline, a dead rank, a backend error or a cancelled op aborts the group and poisons it; every later
call raises :class:`~sage_transport.errors.GroupPoisonedError` at once, naming the op, the rank and why.
:meth:`CommBackend.rebuild` makes a new group (same or new rank and size) from the same rendezvous store.
"""

from __future__ import annotations

import abc
import asyncio
import enum
import time
from typing import Any, ClassVar

import msgspec

from ..errors import CollectiveError, CollectiveTimeoutError, ConfigError, GroupPoisonedError
from ..telemetry.core import Telemetry
from .fusion import CommFusion, FusionEngine, FusionStatistics
from .overlap import OverlapStatistics, OverlapWindow

__all__ = ["CommBackend", "CommStats", "ReduceOp"]


class ReduceOp(str, enum.Enum):
    """Reduction of ``all_reduce`` and ``reduce_scatter``."""

    SUM = "sum"
    AVG = "avg"
    MAX = "max"
    MIN = "min"
    PRODUCT = "product"

    @classmethod
    def parse(cls, value: Any) -> ReduceOp:
        if isinstance(value, cls):
            return value
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            raise ConfigError(f"op={value!r} is not a reduction; choose one of {', '.join(m.value for m in cls)}") from None


class CommStats(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot: ops and bytes by op name, seconds spent inside ops, failures, the overlap window, fusion,
    the group generation and why it is poisoned (None while healthy)."""

    backend: str
    rank: int
    world_size: int
    generation: int
    ops: dict[str, int]
    bytes: dict[str, int]
    seconds: float
    failures: int
    overlap: OverlapStatistics
    fusion: FusionStatistics
    poisoned: str | None


class CommBackend(abc.ABC):
    """Collectives for ``rank`` of ``world_size``. Use as ``async with`` (``aclose()`` on exit).

    Subclasses implement the ``_do_*`` coroutines (called in issue order, inside the deadline), ``_abort``
    and ``_rebuild``. Tensors are torch tensors; ops work in place where the name says so.
    """

    name: ClassVar[str] = "abstract"

    def __init__(
        self,
        rank: int,
        world_size: int,
        *,
        timeout_s: float = 30.0,
        fusion: CommFusion | None = None,
        overlap: int = 4,
        telemetry: Telemetry | None = None,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank={rank!r} must be in 0..{world_size - 1} (world_size={world_size!r})")
        if timeout_s <= 0:
            raise ConfigError(f"timeout_s={timeout_s!r} must be positive")
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.generation = 0
        self.telemetry = telemetry if telemetry is not None else Telemetry()
        self._window = OverlapWindow(overlap)
        self._fusion = FusionEngine(self._issue, fusion or CommFusion(), ReduceOp.MIN)
        self._poisoned: str | None = None
        self._ops: dict[str, int] = {}
        self._bytes: dict[str, int] = {}
        self._seconds = 0.0
        self._failures = 0
        self._closed = False
        self._op_deadline_s = timeout_s  # the deadline of the op being issued (read by backends at issue time)

    # ---- public ops ------------------------------------------------------------------------------------

    async def all_reduce(self, tensor: Any, op: ReduceOp | str = ReduceOp.SUM, *, timeout_s: float | None = None) -> Any:
        """Reduce ``tensor`` across ranks, in place; returns it."""
        reduce_op = ReduceOp.parse(op)
        await self._before_direct("all_reduce")
        return await self._issue("all_reduce", tensor, reduce_op, timeout_s)

    async def fused_all_reduce(self, tensor: Any, op: ReduceOp | str = ReduceOp.SUM, *, timeout_s: float | None = None) -> Any:
        """Like :meth:`all_reduce`, but small tensors share one flat all-reduce (see ``CommFusion``)."""
        reduce_op = ReduceOp.parse(op)
        self._check("fused_all_reduce")
        if not self._fusion.policy.enabled:
            return await self.all_reduce(tensor, reduce_op, timeout_s=timeout_s)
        future = self._fusion.submit(tensor, reduce_op)
        deadline = self.timeout_s if timeout_s is None else timeout_s
        start = time.perf_counter()
        try:
            async with asyncio.timeout(deadline):
                return await asyncio.shield(future)
        except TimeoutError:
            raise self._poison_timeout("fused_all_reduce", deadline, start) from None
        except CollectiveError:
            raise
        except Exception as exc:
            raise CollectiveError(f"fused_all_reduce on rank {self.rank} failed: {exc}") from exc

    async def flush(self, *, timeout_s: float | None = None) -> None:
        """Send every tensor waiting for fusion now."""
        self._check("flush")
        deadline = self.timeout_s if timeout_s is None else timeout_s
        start = time.perf_counter()
        try:
            async with asyncio.timeout(deadline):
                await self._fusion.flush()
        except TimeoutError:
            raise self._poison_timeout("flush", deadline, start) from None

    async def all_gather(self, tensor: Any, *, out: Any = None, timeout_s: float | None = None) -> Any:
        """Every rank's ``tensor``, stacked, shape ``(world_size, *tensor.shape)``: into ``out`` when given (reuse
        it across calls: a fresh output is allocated and faulted in every time otherwise)."""
        _check_out("all_gather", out, tensor, (self.world_size, *tensor.shape))
        await self._before_direct("all_gather")
        return await self._issue("all_gather", tensor, out, timeout_s)

    async def reduce_scatter(
        self, tensor: Any, op: ReduceOp | str = ReduceOp.SUM, *, out: Any = None, timeout_s: float | None = None
    ) -> Any:
        """Reduce ``tensor`` (first dimension divisible by ``world_size``) and return this rank's slice (into
        ``out`` when given)."""
        reduce_op = ReduceOp.parse(op)
        if tensor.dim() == 0 or tensor.shape[0] % self.world_size:
            shape = tuple(tensor.shape)
            raise ConfigError(
                f"reduce_scatter: tensor.shape={shape} has no first dimension divisible by world_size={self.world_size}"
            )
        _check_out("reduce_scatter", out, tensor, (tensor.shape[0] // self.world_size, *tensor.shape[1:]))
        await self._before_direct("reduce_scatter")
        return await self._issue("reduce_scatter", tensor, (reduce_op, out), timeout_s)

    async def broadcast(self, tensor: Any, src: int = 0, *, timeout_s: float | None = None) -> Any:
        """Copy rank ``src``'s ``tensor`` into every rank's, in place; returns it."""
        self._check_rank("src", src)
        await self._before_direct("broadcast")
        return await self._issue("broadcast", tensor, src, timeout_s)

    async def send(self, tensor: Any, dst: int, *, tag: int = 0, timeout_s: float | None = None) -> None:
        """Send ``tensor`` to rank ``dst`` (matched by a ``recv`` there with the same tag)."""
        self._check_rank("dst", dst, other=True)
        await self._before_direct("send")
        await self._issue("send", tensor, (dst, tag), timeout_s)

    async def recv(self, tensor: Any, src: int, *, tag: int = 0, timeout_s: float | None = None) -> Any:
        """Receive into ``tensor`` from rank ``src``; returns it."""
        self._check_rank("src", src, other=True)
        await self._before_direct("recv")
        return await self._issue("recv", tensor, (src, tag), timeout_s)

    async def barrier(self, *, timeout_s: float | None = None) -> None:
        """Wait until every rank reaches the barrier."""
        await self._before_direct("barrier")
        await self._issue("barrier", None, None, timeout_s)

    # ---- policy, stats, lifecycle ----------------------------------------------------------------------

    @property
    def fusion_policy(self) -> CommFusion:
        """The fusion policy in force."""
        return self._fusion.policy

    def set_policy(self, *, fusion: CommFusion | bool | None = None, overlap: int | None = None) -> None:
        """Change fusion (a ``CommFusion``, or True/False to switch it) and the overlap window at run time."""
        if isinstance(fusion, bool):
            self._fusion.policy = msgspec.structs.replace(self._fusion.policy, enabled=fusion)
        elif fusion is not None:
            if not isinstance(fusion, CommFusion):
                raise ConfigError(f"fusion={fusion!r} must be a CommFusion or a bool")
            self._fusion.policy = fusion
        if overlap is not None:
            self._window.set_limit(overlap)

    def get_stats(self) -> CommStats:
        return CommStats(
            backend=self.name, rank=self.rank, world_size=self.world_size, generation=self.generation,
            ops=dict(self._ops), bytes=dict(self._bytes), seconds=round(self._seconds, 6), failures=self._failures,
            overlap=self._window.statistics(), fusion=self._fusion.statistics(), poisoned=self._poisoned,
        )  # fmt: skip

    @property
    def poisoned(self) -> str | None:
        return self._poisoned

    async def rebuild(self, *, rank: int | None = None, world_size: int | None = None) -> None:
        """Replace the group with a new one (a new generation on the same rendezvous store): every rank of
        the new group calls this with its new ``rank`` and the new ``world_size``."""
        rank = self.rank if rank is None else rank
        world_size = self.world_size if world_size is None else world_size
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank={rank!r} must be in 0..{world_size - 1} (world_size={world_size!r})")
        await self._fusion.aclose()
        self._fusion.fail(GroupPoisonedError("the group was rebuilt"))
        self.generation += 1
        await self._rebuild(rank, world_size)
        self.rank, self.world_size = rank, world_size
        self._fusion = FusionEngine(self._issue, self._fusion.policy, ReduceOp.MIN)
        self._poisoned = None

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._fusion.aclose()
        self._fusion.fail(GroupPoisonedError("the backend is closed"))
        await self._close()

    async def __aenter__(self) -> CommBackend:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ---- the issue path --------------------------------------------------------------------------------

    def _check(self, op: str) -> None:
        if self._closed:
            raise GroupPoisonedError(f"{op} on rank {self.rank}: the backend is closed")
        if self._poisoned is not None:
            raise GroupPoisonedError(f"{op} on rank {self.rank}: the group failed earlier ({self._poisoned}); rebuild it")

    def _check_rank(self, name: str, value: int, other: bool = False) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < self.world_size:
            raise ConfigError(f"{name}={value!r} must be a rank in 0..{self.world_size - 1}")
        if other and value == self.rank:
            raise ConfigError(f"{name}={value!r} is this rank; send and recv need another rank")

    async def _before_direct(self, op: str) -> None:
        self._check(op)
        if self._fusion.pending:
            await self.flush()

    async def _issue(self, op: str, tensor: Any, arg: Any, timeout_s: float | None = None) -> Any:
        self._check(op)
        deadline = self.timeout_s if timeout_s is None else timeout_s
        start = time.perf_counter()
        try:
            async with asyncio.timeout(deadline):
                async with self._window:
                    self._op_deadline_s = deadline
                    self.telemetry.comm_begin()
                    try:
                        result = await self._dispatch(op, tensor, arg)
                    finally:
                        self.telemetry.comm_end()
        except TimeoutError:
            raise self._poison_timeout(op, deadline, start) from None
        except asyncio.CancelledError:
            self._poison(f"{op} was cancelled after {time.perf_counter() - start:.3f} s, so the ranks no longer agree")
            raise
        except Exception as exc:
            elapsed = time.perf_counter() - start
            self._poison(f"{op} failed after {elapsed:.3f} s: {exc}")
            raise CollectiveError(f"{op} on rank {self.rank} of {self.world_size} failed after {elapsed:.3f} s: {exc}") from exc
        self._ops[op] = self._ops.get(op, 0) + 1
        if tensor is not None:
            self._bytes[op] = self._bytes.get(op, 0) + tensor.numel() * tensor.element_size()
        self._seconds += time.perf_counter() - start
        return result

    def _dispatch(self, op: str, tensor: Any, arg: Any) -> Any:
        if op in ("all_reduce", "fusion_agree"):
            return self._do_all_reduce(tensor, arg)
        if op == "all_gather":
            return self._do_all_gather(tensor, arg)
        if op == "reduce_scatter":
            return self._do_reduce_scatter(tensor, *arg)
        if op == "broadcast":
            return self._do_broadcast(tensor, arg)
        if op == "send":
            return self._do_send(tensor, *arg)
        if op == "recv":
            return self._do_recv(tensor, *arg)
        if op == "barrier":
            return self._do_barrier()
        raise ConfigError(f"unknown collective {op!r}")

    def _poison_timeout(self, op: str, deadline: float, start: float) -> CollectiveTimeoutError:
        elapsed = time.perf_counter() - start
        reason = f"{op} on rank {self.rank} of {self.world_size} passed its {deadline:g} s deadline after {elapsed:.3f} s"
        self._poison(reason)
        return CollectiveTimeoutError(f"{reason}; the group is aborted")

    def _poison(self, reason: str) -> None:
        if self._poisoned is None:
            self._poisoned = reason
            self._failures += 1
            self._fusion.fail(GroupPoisonedError(f"the group failed: {reason}"))
            try:
                self._abort()
            except Exception:  # aborting a broken group is best effort
                pass

    # ---- backend hooks ---------------------------------------------------------------------------------

    @abc.abstractmethod
    async def _do_all_reduce(self, tensor: Any, op: ReduceOp) -> Any: ...

    @abc.abstractmethod
    async def _do_all_gather(self, tensor: Any, out: Any) -> Any: ...

    @abc.abstractmethod
    async def _do_reduce_scatter(self, tensor: Any, op: ReduceOp, out: Any) -> Any: ...

    @abc.abstractmethod
    async def _do_broadcast(self, tensor: Any, src: int) -> Any: ...

    @abc.abstractmethod
    async def _do_send(self, tensor: Any, dst: int, tag: int) -> None: ...

    @abc.abstractmethod
    async def _do_recv(self, tensor: Any, src: int, tag: int) -> Any: ...

    @abc.abstractmethod
    async def _do_barrier(self) -> None: ...

    @abc.abstractmethod
    def _abort(self) -> None:
        """Abort the group now (synchronous, best effort): in-flight ops on other ranks fail."""

    @abc.abstractmethod
    async def _rebuild(self, rank: int, world_size: int) -> None:
        """Build the group of ``self.generation`` for ``rank`` of ``world_size``."""

    @abc.abstractmethod
    async def _close(self) -> None: ...


def _check_out(op: str, out: Any, tensor: Any, shape: tuple[int, ...]) -> None:
    if out is None:
        return
    if tuple(out.shape) != tuple(shape) or out.dtype != tensor.dtype or out.device != tensor.device or not out.is_contiguous():
        raise ConfigError(
            f"{op}: out (shape {tuple(out.shape)}, {out.dtype}, {out.device}) must be contiguous, shape {tuple(shape)}, "
            f"{tensor.dtype} on {tensor.device}"
        )
