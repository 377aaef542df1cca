"""The asyncio core on a thread of its own, for engines that call adapters synchronously (vLLM, LMDeploy's workers).

One :class:`LoopThread` per process: a daemon thread runs an event loop; :meth:`LoopThread.call` runs a coroutine
there and waits for it, :meth:`LoopThread.submit` returns a :class:`concurrent.futures.Future` at once, so the
engine's thread never blocks longer than it chooses to.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["LoopThread", "shared_loop"]

_T = TypeVar("_T")
_lock = threading.Lock()
_shared: LoopThread | None = None


class LoopThread:
    """An event loop on a daemon thread."""

    def __init__(self, name: str = "sage-transport-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, _T]) -> concurrent.futures.Future[_T]:
        """Schedule ``coro`` on the loop; returns its future at once."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Coroutine[Any, Any, _T], timeout: float | None = None) -> _T:
        """Run ``coro`` on the loop and wait for its result (``timeout`` seconds at most)."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("LoopThread.call from the loop's own thread would deadlock; await the coroutine instead")
        return self.submit(coro).result(timeout)

    def stop(self) -> None:
        """Stop the loop, join its thread and close the loop (tasks still pending are dropped)."""
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive() and not self.loop.is_closed():
            self.loop.close()


def shared_loop() -> LoopThread:
    """This process's loop thread, started on first use."""
    global _shared
    with _lock:
        if _shared is None:
            _shared = LoopThread()
        return _shared
