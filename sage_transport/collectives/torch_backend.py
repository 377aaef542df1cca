"""Collectives on a torch.distributed process group built directly (``ProcessGroupGloo`` / ``ProcessGroupNCCL``),
never the global default group, so several groups and generations live side by side in one process.

Completion is awaited without parking the event loop: Gloo's work future is bridged into the loop by a
callback; work without a future (Gloo's send, recv, reduce_scatter) is waited for by a helper thread with the
op's deadline; NCCL's CUDA events are polled with an adaptive back-off.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import datetime
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar

from ..errors import CollectiveError, ConfigError
from ..polling import poll_until
from ..telemetry.core import Telemetry
from .base import CommBackend, ReduceOp
from .fusion import CommFusion

__all__ = ["TorchProcessGroupBackend", "poll_until"]


def _wake(target: asyncio.Future[None]) -> None:
    if not target.done():
        target.set_result(None)


class TorchProcessGroupBackend(CommBackend):
    """A ``CommBackend`` over a torch process group. Build with ``await Backend.create(rank, world_size, store)``
    where ``store`` is any torch ``Store`` (``TCPStore``, a ``FileStore``; every rank uses the same one)."""

    name: ClassVar[str] = "torch"
    _torch_op_names: ClassVar[dict[ReduceOp, str]] = {
        ReduceOp.SUM: "SUM", ReduceOp.MAX: "MAX", ReduceOp.MIN: "MIN", ReduceOp.PRODUCT: "PRODUCT",
    }  # fmt: skip
    native_avg: ClassVar[bool] = False
    #: whether ``pg.abort()`` is safe to call on a failed group (NCCL: ncclCommAbort); Gloo's is not
    abort_in_place: ClassVar[bool] = False

    def __init__(self, rank: int, world_size: int, store: Any, *, timeout_s: float = 30.0, fusion: CommFusion | None = None,
                 overlap: int = 4, telemetry: Telemetry | None = None) -> None:  # fmt: skip
        super().__init__(rank, world_size, timeout_s=timeout_s, fusion=fusion, overlap=overlap, telemetry=telemetry)
        self.store = store
        self.pg: Any = None
        self._waiter_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._failed_groups: list[Any] = []  # failed groups, kept alive until they are shut down (see _abort)
        self._inflight: set[Any] = set()  # work objects issued and not yet finished
        self._retiring: list[threading.Thread] = []
        self._options_cache: dict[tuple[str, ReduceOp], Any] = {}

    def _waiters(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._waiter_pool is None:
            self._waiter_pool = concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix=f"sage-{self.name}-wait")
        return self._waiter_pool

    @classmethod
    async def create(cls, rank: int, world_size: int, store: Any, **options: Any) -> TorchProcessGroupBackend:
        backend = cls(rank, world_size, store, **options)
        await backend._rebuild(rank, world_size)
        return backend

    # ---- group -----------------------------------------------------------------------------------------

    @abc.abstractmethod
    def _make_group(self, store: Any, rank: int, world_size: int, timeout: datetime.timedelta) -> Any:
        """The process group for ``rank`` of ``world_size`` on ``store`` (runs in a thread: it blocks until
        every rank joins)."""

    async def _rebuild(self, rank: int, world_size: int) -> None:
        import torch.distributed as dist

        if self.pg is not None:
            self._abort()
        prefix = f"sage_transport/comm/{self.generation}/{world_size}"
        prefixed = dist.PrefixStore(prefix, self.store)  # type: ignore[attr-defined]
        # the backend's own deadline fires first; torch's timeout only bounds a group nobody awaits any more
        timeout = datetime.timedelta(seconds=self.timeout_s + 5)
        loop = asyncio.get_running_loop()
        try:
            self.pg = await loop.run_in_executor(None, self._make_group, prefixed, rank, world_size, timeout)
        except Exception as exc:
            raise CollectiveError(f"{self.name}: rank {rank} of {world_size} could not join the group: {exc}") from exc

    def _abort(self) -> None:
        pg, self.pg = self.pg, None
        if pg is None:
            return
        if self.abort_in_place:
            threading.Thread(target=_shutdown, args=(pg, ("abort",)), name=f"sage-{self.name}-abort", daemon=True).start()
            return
        # Gloo's abort and shutdown hold the GIL while they wait for in-flight work (up to the group's own
        # timeout), and a group left open dies with std::terminate when a peer closes its socket later. So a
        # daemon thread lets the in-flight work end first (a peer's error or the group's timeout; Work.wait
        # releases the GIL), then shuts the group down; until then the group is kept alive here.
        works = list(self._inflight)
        self._inflight.clear()
        self._failed_groups.append(pg)
        retiring = threading.Thread(target=_retire, args=(pg, works), name=f"sage-{self.name}-retire", daemon=True)
        retiring.start()
        self._retiring.append(retiring)

    async def _close(self) -> None:
        pg, self.pg = self.pg, None
        if pg is not None:
            closing = threading.Thread(target=_shutdown, args=(pg,), name=f"sage-{self.name}-close", daemon=True)
            closing.start()
            await asyncio.get_running_loop().run_in_executor(None, closing.join, 5.0)
        deadline = time.monotonic() + self.timeout_s + 5  # failed groups: their in-flight work ends by then
        for retiring in self._retiring:
            await asyncio.get_running_loop().run_in_executor(None, retiring.join, max(0.0, deadline - time.monotonic()))
        if self._waiter_pool is not None:
            self._waiter_pool.shutdown(wait=False, cancel_futures=True)

    def _group(self) -> Any:
        if self.pg is None:
            raise CollectiveError(f"{self.name}: rank {self.rank} has no group (aborted or closed)")
        return self.pg

    # ---- waiting ---------------------------------------------------------------------------------------

    async def _run(self, launch: Callable[[Any], Any], traffic: str = "collective") -> None:
        """Issue ``launch(pg)`` (returns a work object) and wait for it without blocking the loop."""
        work = launch(self._group())
        self._inflight.add(work)
        try:
            await self._wait_work(work)
        except asyncio.CancelledError:
            raise  # still in flight inside Gloo: it stays listed for _abort to wait out
        except BaseException:
            self._inflight.discard(work)
            raise
        self._inflight.discard(work)

    async def _wait_work(self, work: Any) -> None:
        loop = asyncio.get_running_loop()
        try:
            future = work.get_future()
        except RuntimeError:
            # Gloo's send, recv and reduce_scatter have no future ("Work::getFuture not implemented") and
            # reduce_scatter never reports is_completed(): a helper thread waits, bounded by the op's deadline
            timeout = datetime.timedelta(seconds=self._op_deadline_s + 1)
            await loop.run_in_executor(self._waiters(), work.wait, timeout)
            return
        done: asyncio.Future[None] = loop.create_future()

        def on_done(_: Any) -> None:  # runs on Gloo's thread, or inline if already complete
            try:
                loop.call_soon_threadsafe(_wake, done)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass

        future.add_done_callback(on_done)
        await done
        work.wait()  # complete: returns at once, or raises the op's error

    # ---- ops -------------------------------------------------------------------------------------------

    def _reduce_options(self, kind: str, op: ReduceOp) -> Any:
        """torch's options object for ``kind`` and ``op`` (built once: the hot path reuses it)."""
        options = self._options_cache.get((kind, op))
        if options is None:
            import torch.distributed as dist

            options = getattr(dist, kind)()
            if op is ReduceOp.AVG:
                options.reduceOp = dist.ReduceOp.AVG if self.native_avg else dist.ReduceOp.SUM
            else:
                options.reduceOp = getattr(dist.ReduceOp, self._torch_op_names[op])
            self._options_cache[(kind, op)] = options
        return options

    def _finish_avg(self, tensor: Any, op: ReduceOp) -> Any:
        if op is not ReduceOp.AVG or self.native_avg:
            return tensor
        if tensor.is_floating_point():
            return tensor.div_(self.world_size)
        import torch

        tensor.copy_(torch.div(tensor, self.world_size, rounding_mode="floor"))
        return tensor

    async def _do_all_reduce(self, tensor: Any, op: ReduceOp) -> Any:
        _contiguous(tensor, "all_reduce")
        options = self._reduce_options("AllreduceOptions", op)
        await self._run(lambda pg: pg.allreduce([tensor], options))
        return self._finish_avg(tensor, op)

    async def _do_all_gather(self, tensor: Any, out: Any) -> Any:
        import torch

        _contiguous(tensor, "all_gather")
        if out is None:
            out = torch.empty((self.world_size, *tensor.shape), dtype=tensor.dtype, device=tensor.device)
        parts = list(out.unbind(0))
        await self._run(lambda pg: pg.allgather([parts], [tensor]))
        return out

    async def _do_reduce_scatter(self, tensor: Any, op: ReduceOp, out: Any) -> Any:
        import torch

        _contiguous(tensor, "reduce_scatter")
        chunks = [c.contiguous() for c in tensor.chunk(self.world_size)]
        if out is None:
            out = torch.empty_like(chunks[0])
        options = self._reduce_options("ReduceScatterOptions", op)
        await self._run(lambda pg: pg.reduce_scatter([out], [chunks], options))
        return self._finish_avg(out, op)

    async def _do_broadcast(self, tensor: Any, src: int) -> Any:
        import torch.distributed as dist

        _contiguous(tensor, "broadcast")
        options = dist.BroadcastOptions()
        options.rootRank = src
        await self._run(lambda pg: pg.broadcast([tensor], options))
        return tensor

    async def _do_send(self, tensor: Any, dst: int, tag: int) -> None:
        _contiguous(tensor, "send")
        await self._run(lambda pg: pg.send([tensor], dst, tag), traffic="p2p")

    async def _do_recv(self, tensor: Any, src: int, tag: int) -> Any:
        _contiguous(tensor, "recv")
        await self._run(lambda pg: pg.recv([tensor], src, tag), traffic="p2p")
        return tensor

    async def _do_barrier(self) -> None:
        await self._run(lambda pg: pg.barrier())


def _contiguous(tensor: Any, op: str) -> None:
    if not tensor.is_contiguous():
        raise ConfigError(f"{op}: the tensor (shape {tuple(tensor.shape)}) must be contiguous")


def _retire(pg: Any, works: list[Any]) -> None:
    for work in works:
        try:
            work.wait()
        except Exception:  # the failure that poisoned the group, most likely
            pass
    _shutdown(pg)


def _shutdown(pg: Any, methods: tuple[str, ...] = ("shutdown", "abort")) -> None:
    for method in methods:
        try:
            getattr(pg, method)()
            return
        except Exception:
            continue
