"""Waiting on a condition the event loop can only poll (a CUDA event's ``query``): no thread blocks, the loop stays free."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

__all__ = ["poll_until"]

#: Back-off of a polling wait: yield to the loop this many times, then sleep from ``_FIRST_SLEEP_S`` doubling
#: to ``_MAX_SLEEP_S``.
_YIELDS = 16
_FIRST_SLEEP_S = 20e-6
_MAX_SLEEP_S = 1e-3


async def poll_until(done: Callable[[], bool]) -> None:
    """Wait until ``done()`` is true: first by yielding to the loop, then by sleeping with a doubling back-off."""
    spins = 0
    sleep = _FIRST_SLEEP_S
    while not done():
        if spins < _YIELDS:
            spins += 1
            await asyncio.sleep(0)
        else:
            await asyncio.sleep(sleep)
            sleep = min(sleep * 2, _MAX_SLEEP_S)
