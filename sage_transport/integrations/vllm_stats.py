"""Statistics and Prometheus families of :class:`~sage_transport.integrations.vllm.SageKVConnector`."""

from __future__ import annotations

import dataclasses
from typing import Any

try:
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats
except ImportError:  # importable without vLLM
    KVConnectorPromMetrics = object  # type: ignore[assignment,misc]
    KVConnectorStats = object  # type: ignore[assignment,misc]

__all__ = ["SageKVConnectorStats", "SagePromMetrics"]

_STAT_SERIES = ("load_seconds", "load_bytes", "load_wire_bytes")
_STAT_COUNTS = ("load_failures", "served", "served_failures", "hold_expired")


@dataclasses.dataclass
class SageKVConnectorStats(KVConnectorStats):  # type: ignore[misc]
    """Transfer statistics a worker reports each step (vLLM aggregates them across workers, logs and exports them).

    ``data``: per finished pull ``load_seconds``, ``load_bytes`` (KV as stored) and ``load_wire_bytes``; counts of
    ``load_failures``, of transfers this worker ``served`` to a decode, of ``served_failures`` and of prefills
    whose blocks were freed unpulled after ``hold_timeout_s`` (``hold_expired``)."""

    data: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in _STAT_SERIES:
            self.data.setdefault(key, [])
        for key in _STAT_COUNTS:
            self.data.setdefault(key, 0)

    def reset(self) -> None:
        self.data = {}
        self.__post_init__()

    def aggregate(self, other: Any) -> SageKVConnectorStats:
        for key in _STAT_SERIES:
            self.data[key] = list(self.data[key]) + list(other.data.get(key, []))
        for key in _STAT_COUNTS:
            self.data[key] += int(other.data.get(key, 0))
        return self

    def reduce(self) -> dict[str, int | float]:
        seconds, nbytes = self.data["load_seconds"], self.data["load_bytes"]
        busy = sum(seconds)
        ordered = sorted(seconds)
        return {
            "num_loads": len(seconds),
            "avg_load_ms": round(busy / len(seconds) * 1e3, 3) if seconds else 0.0,
            "p90_load_ms": round(ordered[int(0.9 * (len(ordered) - 1))] * 1e3, 3) if ordered else 0.0,
            "loaded_MB": round(sum(nbytes) / 1e6, 3),
            "wire_MB": round(sum(self.data["load_wire_bytes"]) / 1e6, 3),
            "load_GBps": round(sum(nbytes) / busy / 1e9, 3) if busy else 0.0,
            "load_failures": self.data["load_failures"],
            "served": self.data["served"],
            "served_failures": self.data["served_failures"],
            "hold_expired": self.data["hold_expired"],
        }

    def is_empty(self) -> bool:
        return not self.data["load_seconds"] and not any(self.data[k] for k in _STAT_COUNTS)


class SagePromMetrics(KVConnectorPromMetrics):  # type: ignore[misc]
    """The connector's Prometheus families, per engine: ``vllm:sage_transport_load_seconds`` and ``_load_bytes``
    (histograms per pull), ``_load_failures``, ``_served``, ``_served_failures`` and ``_hold_expired`` (counters)."""

    def __init__(self, vllm_config: Any, metric_types: Any, labelnames: list[str], per_engine_labelvalues: Any) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)

        def per_engine(metric: Any) -> dict[int, Any]:
            return {idx: metric.labels(*values) for idx, values in self.per_engine_labelvalues.items()}

        self.load_seconds = per_engine(
            self._histogram_cls(
                name="vllm:sage_transport_load_seconds", documentation="Time of each KV pull by the SageKVConnector.",
                buckets=[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0], labelnames=labelnames,
            )
        )  # fmt: skip
        self.load_bytes = per_engine(
            self._histogram_cls(
                name="vllm:sage_transport_load_bytes", documentation="KV bytes (as stored) of each pull.",
                buckets=[2 ** (16 + 2 * i) for i in range(9)], labelnames=labelnames,
            )
        )  # fmt: skip
        self.counters = {
            key: per_engine(self._counter_cls(name=f"vllm:sage_transport_{key}", documentation=doc, labelnames=labelnames))
            for key, doc in (
                ("load_failures", "KV pulls that failed (their blocks are reported as load errors)."),
                ("served", "KV transfers this prefill worker sent to a decode that pulled them."),
                ("served_failures", "KV transfers this prefill worker could not complete."),
                ("hold_expired", "Prefilled requests whose blocks were freed unpulled after hold_timeout_s."),
            )
        }

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for seconds in transfer_stats_data.get("load_seconds", []):
            self.load_seconds[engine_idx].observe(seconds)
        for nbytes in transfer_stats_data.get("load_bytes", []):
            self.load_bytes[engine_idx].observe(nbytes)
        for key, counter in self.counters.items():
            if transfer_stats_data.get(key):
                counter[engine_idx].inc(transfer_stats_data[key])
