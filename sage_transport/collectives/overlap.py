"""``OverlapWindow``: how many communication ops may be in flight beside compute (sageLLM's
``compute_comm_overlap`` knob).

Admission is strictly first-come, first-served: collectives must be issued in the same order on every rank, so
an op never overtakes one that was called before it, even when a slot frees up while a later caller runs.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import msgspec

from ..errors import ConfigError

__all__ = ["OverlapWindow", "OverlapStatistics", "check_overlap"]


class OverlapStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """``inflight`` now, the most seen at once since the limit was last set, and how many ops had to wait."""

    limit: int
    inflight: int
    max_inflight_seen: int
    waited: int


class OverlapWindow:
    """At most ``max_inflight`` ops in flight; ``set_limit`` changes it at run time (waiters are re-checked)."""

    def __init__(self, max_inflight: int = 4) -> None:
        self._limit = _check(max_inflight)
        self._inflight = 0
        self._max_seen = 0
        self._waited = 0
        self._queue: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def limit(self) -> int:
        return self._limit

    def set_limit(self, max_inflight: int) -> None:
        self._limit = _check(max_inflight)
        self._max_seen = self._inflight
        self._admit()

    async def acquire(self) -> None:
        """Wait for a slot, in call order."""
        if not self._queue and self._inflight < self._limit:
            self._take()
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(future)
        self._waited += 1
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # admitted just as the waiter was cancelled: give the slot back
            else:
                self._queue.remove(future)
            raise

    def release(self) -> None:
        self._inflight -= 1
        self._admit()

    async def __aenter__(self) -> OverlapWindow:
        await self.acquire()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()

    def statistics(self) -> OverlapStatistics:
        return OverlapStatistics(
            limit=self._limit, inflight=self._inflight, max_inflight_seen=self._max_seen, waited=self._waited
        )

    def _take(self) -> None:
        self._inflight += 1
        self._max_seen = max(self._max_seen, self._inflight)

    def _admit(self) -> None:
        while self._queue and self._inflight < self._limit:
            future = self._queue.popleft()
            if not future.done():
                self._take()
                future.set_result(None)


def check_overlap(value: Any) -> int:
    """``value`` as an overlap window (communication ops in flight), or a ``ConfigError`` naming it."""
    return _check(value)


def _check(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1024:
        raise ConfigError(f"overlap={value!r} must be an integer in 1..1024 (communication ops in flight)")
    return value
