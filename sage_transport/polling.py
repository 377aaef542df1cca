"""Waiting on a condition the event loop can only poll (a CUDA event's ``query``): no thread blocks, the loop stays free."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

__all__ = ["poll_until"]

#: A polling wait first yields to the loop (other tasks and I/O run between polls) for this long, then sleeps
#: ``_SLEEP_S`` between polls. Not sooner: the loop's selector sleeps in whole milliseconds (epoll rounds a 20 µs
#: timeout up to 1 ms), so a wait that slept after a few yields noticed a 50 µs kernel ~1 ms late, once per wait
#: (every CUDA step of a device transfer, every NCCL op).
_SPIN_S = 2e-3
_SLEEP_S = 1e-3


async def poll_until(done: Callable[[], bool]) -> None:
    """Wait until ``done()`` is true: yielding to the loop for up to ``_SPIN_S``, then sleeping ``_SLEEP_S``
    between polls."""
    if done():
        return
    spin_until = time.perf_counter() + _SPIN_S
    while not done():
        if time.perf_counter() < spin_until:
            await asyncio.sleep(0)
        else:
            await asyncio.sleep(_SLEEP_S)
