"""Drives one UCX worker from the event loop and turns finished UCX requests into awaitable futures.

``polling`` spins (``worker.progress()`` then ``await asyncio.sleep(0)``) for the lowest latency and burns
a core. ``blocking`` spins while an operation other than an idle receive is in flight and for
``spin_s`` after the last completion (a reply usually comes within it, and an epoll wake-up costs tens of
microseconds here); otherwise it arms the worker and sleeps until the worker's epoll descriptor or a new
request wakes it. No thread: a
progress thread fights the event loop for the GIL and costs milliseconds at p99 on small machines.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from typing import Any

__all__ = ["WorkerProgress"]


class WorkerProgress:
    """Progress for one worker on the running loop. ``track`` returns a future for a pending request."""

    def __init__(self, worker: Any, polling: bool, spin_s: float = 200e-6) -> None:
        self.worker = worker
        self.polling = polling
        self.spin_s = spin_s
        self._active_at = 0.0
        self._loop = asyncio.get_running_loop()
        self._pending: list[tuple[Any, asyncio.Future[None], bool, Any, object, bool]] = []
        self._idle = 0  # pending receives that may wait forever (a connection's next-frame receive)
        self.wedged = 0  # requests UCX will never release (given up with a dead peer, or cancelled by a forced close)
        self.peer_died = False  # whether any of them was given up because a same-host peer died
        self._wake = asyncio.Event()
        worker.init_blocking_progress_mode()
        self._fd = worker.epoll_file_descriptor
        self._loop.add_reader(self._fd, self._wake.set)
        self._task = self._loop.create_task(self._run(), name="sage-ucx-progress")

    def track(
        self, request: Any, keepalive: Any, idle: bool = False, owner: object = None, sending: bool = False
    ) -> asyncio.Future[None]:
        """A future resolved when ``request`` completes (its error as the exception). ``keepalive`` (the
        buffer) stays referenced until UCX is done with it, even if the waiter is cancelled; ``owner`` (the
        connection) lets :meth:`abandon` drop a dead peer's sends."""
        future = self._loop.create_future()
        self._active_at = time.perf_counter()
        self._pending.append((request, future, idle, keepalive, owner, sending))
        if idle:
            self._idle += 1
        self._wake.set()
        return future

    def _reap(self) -> None:
        pending = self._pending
        if not any(entry[0].completed for entry in pending):
            return
        self._active_at = time.perf_counter()
        still = []
        for entry in pending:
            request, future, idle, _, _, _ = entry
            if not request.completed:
                still.append(entry)
                continue
            if idle:
                self._idle -= 1
            if not future.done():
                try:
                    request.check_error()
                except Exception as exc:
                    future.set_exception(exc)
                    future.exception()  # the waiter may have been cancelled: never "never retrieved"
                else:
                    future.set_result(None)
        self._pending[:] = still

    async def _run(self) -> None:
        worker, pending = self.worker, self._pending
        spins = 0
        while True:
            worker.progress()
            if pending:
                self._reap()
            if self.polling or len(pending) > self._idle or time.perf_counter() - self._active_at < self.spin_s:
                spins += 1
                if spins & 15 == 0 and threading.active_count() > 1:
                    time.sleep(0)  # noqa: ASYNC251  # drops the GIL for worker threads (placement copies): a spinning loop never does
                await asyncio.sleep(0)
                continue
            if worker.arm():
                self._wake.clear()
                await self._wake.wait()

    def fail(self, futures: set[asyncio.Future[None]], exc: BaseException) -> None:
        """Fail the waiters of a broken connection (their requests are cancelled when its endpoint closes)."""
        for future in futures:
            if not future.done():
                future.set_exception(exc)
                future.exception()

    def holds(self, owner: object) -> bool:
        """Whether any of ``owner``'s requests is unfinished."""
        return any(entry[4] is owner and not entry[0].completed for entry in self._pending)

    def abandon(self, owner: object, exc: BaseException) -> int:
        """Give up ``owner``'s unfinished sends: their waiters get ``exc`` and their buffers are released.

        For a dead same-host peer only: its endpoint has no peer error handling, so UCX never completes a send
        the peer had not taken, and nothing can touch the buffer any more (the reader was the dead process).
        The worker then holds those requests for good (see :meth:`close`)."""
        keep, dropped = [], 0
        for entry in self._pending:
            request, future, idle, _, who, sending = entry
            if who is not owner or not sending or request.completed:
                keep.append(entry)
                continue
            dropped += 1
            if idle:
                self._idle -= 1
            if not future.done():
                future.set_exception(exc)
                future.exception()
        self._pending[:] = keep
        self.wedged += dropped
        self.peer_died |= dropped > 0
        return dropped

    async def drain(self, timeout_s: float) -> None:
        """Progress until no request but idle receives is pending, or ``timeout_s`` passes."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while len(self._pending) > self._idle:
                    self._wake.set()
                    await asyncio.sleep(0)

    def close(self) -> bool:
        """Stop progressing, cancel what UCX still holds and drop every request before the worker goes:
        a request outliving its worker aborts the process when the garbage collector reaches it.

        Returns whether the worker is *wedged*: UCX still holds requests it will never finish (sends to a
        dead same-host peer), so the worker must be kept alive rather than destroyed."""
        self._task.cancel()
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self._fd)
        if self._pending:
            with contextlib.suppress(Exception):
                self.worker.cancel_inflight_requests()
            for _ in range(100):
                self.worker.progress()
                if all(entry[0].completed for entry in self._pending):
                    break
        wedged = self.wedged > 0
        for request, future, idle, _, _, _ in self._pending:
            wedged = wedged or (not idle and not request.completed)
            if not future.done():
                future.cancel()
        self._pending.clear()
        self._idle = 0
        return wedged
