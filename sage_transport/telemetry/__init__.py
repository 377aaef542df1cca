"""Telemetry: measurements kept where the work happens (:mod:`.core`), chunk traces (:mod:`.trace`), a Prometheus
collector read at scrape time (:mod:`.prometheus`, imports prometheus_client), and the HTTP server beside it for
``/metrics``, ``/summary`` and the ``/control`` plane (:mod:`.server`)."""

from .core import LATENCY_BUCKETS_S, Histogram, HistogramSnapshot, Telemetry, TelemetryStatistics
from .trace import ChunkTracer, chrome_trace

__all__ = [
    "LATENCY_BUCKETS_S",
    "ChunkTracer",
    "Histogram",
    "HistogramSnapshot",
    "Telemetry",
    "TelemetryStatistics",
    "chrome_trace",
]
