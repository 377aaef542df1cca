"""Measurements kept as plain numbers where the work happens, read by exporters at scrape time.

- :class:`Histogram`: fixed log-spaced buckets (seconds), one list increment per observation.
- :class:`Telemetry`: shared by a process's channels and collective backends. It tracks when any communication is in
  flight (a begin/end per transfer or collective op, never per chunk) and the engine's steps (``with
  telemetry.step():``), so the *communication share* of a step is the time inside the step during which any
  communication was in flight, over the step's duration.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import time
from collections.abc import Callable, Iterator

import msgspec

__all__ = ["Histogram", "HistogramSnapshot", "Telemetry", "TelemetryStatistics", "LATENCY_BUCKETS_S"]

#: Upper bounds (seconds) of the latency buckets: 50 µs to 10 s, about three per decade.
LATENCY_BUCKETS_S: tuple[float, ...] = (
    50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


class HistogramSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """Bucket upper bounds, the count in each bucket (the last is above every bound), sum and count."""

    bounds: tuple[float, ...]
    counts: list[int]
    sum: float
    count: int

    def quantile(self, q: float) -> float:
        """An estimate of the ``q`` quantile: linear within the bucket that holds it (0 when empty)."""
        if self.count == 0:
            return 0.0
        rank = q * self.count
        seen = 0
        for i, n in enumerate(self.counts):
            if n and seen + n >= rank:
                low = self.bounds[i - 1] if i > 0 else 0.0
                high = self.bounds[i] if i < len(self.bounds) else self.bounds[-1] * 2
                return low + (high - low) * max(0.0, rank - seen) / n
            seen += n
        return self.bounds[-1]


class Histogram:
    """Counts of observations per bucket: ``observe`` is a bisect and two additions."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS_S) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def snapshot(self) -> HistogramSnapshot:
        return HistogramSnapshot(bounds=self.bounds, counts=list(self.counts), sum=self.sum, count=self.count)


class TelemetryStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """Steps marked, their total and last duration, communication time inside them, the last step's and the
    overall communication share, and communication in flight now."""

    steps: int
    step_seconds: float
    step_comm_seconds: float
    last_step_seconds: float
    last_step_comm_share: float
    comm_share: float
    comm_seconds: float
    comm_inflight: int


class Telemetry:
    """Step and communication-time tracking for one process (pass one to every channel and backend that
    should count towards the same steps). ``clock`` is injectable for tests."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._busy = 0
        self._busy_since = 0.0
        self._busy_total = 0.0
        self._steps = 0
        self._step_total = 0.0
        self._step_comm_total = 0.0
        self._last_step = 0.0
        self._last_share = 0.0
        self.recent_transfer_seconds: collections.deque[float] = collections.deque(maxlen=1024)

    def comm_begin(self) -> None:
        """A transfer or collective op starts (one call per operation, not per chunk)."""
        if self._busy == 0:
            self._busy_since = self._clock()
        self._busy += 1

    def comm_end(self) -> None:
        self._busy -= 1
        if self._busy == 0:
            self._busy_total += self._clock() - self._busy_since

    def comm_seconds(self) -> float:
        """Seconds during which any communication was in flight, so far."""
        if self._busy:
            return self._busy_total + self._clock() - self._busy_since
        return self._busy_total

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """Mark one engine step: its duration and the communication time inside it are recorded."""
        start, comm = self._clock(), self.comm_seconds()
        try:
            yield
        finally:
            duration = self._clock() - start
            inside = self.comm_seconds() - comm
            self._steps += 1
            self._step_total += duration
            self._step_comm_total += inside
            self._last_step = duration
            self._last_share = inside / duration if duration > 0 else 0.0

    def statistics(self) -> TelemetryStatistics:
        return TelemetryStatistics(
            steps=self._steps, step_seconds=self._step_total, step_comm_seconds=self._step_comm_total,
            last_step_seconds=self._last_step, last_step_comm_share=self._last_share,
            comm_share=self._step_comm_total / self._step_total if self._step_total > 0 else 0.0,
            comm_seconds=self.comm_seconds(), comm_inflight=self._busy,
        )  # fmt: skip
