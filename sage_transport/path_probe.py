"""``sage-transport probe --peer HOST:PORT``: measure the path to a running ``sage-transport serve``.

Two phases through the real channel, each one job on the receiver: *latency*, many transfers of one
token of KV (``qwen2.5-7b``: 56 KiB across 28 layers × K/V), timed from submit to acknowledgement; and
*bandwidth*, a few transfers of 4096 tokens (224 MiB). The report names the transports really used
(UCX's own protocol table, or the TCP transport) and how chunks were placed.
"""

from __future__ import annotations

import msgspec

from .config import KVTransportConfig
from .migrate import run_migration

__all__ = ["PathReport", "probe_path"]

LATENCY_MODEL = "qwen2.5-7b"


class PathReport(msgspec.Struct, frozen=True, kw_only=True):
    """What ``probe --peer`` measured. Latencies are per transfer (submit → every chunk acknowledged)."""

    peer: str
    transport: str
    preset: str | None
    ucx_transports: dict[str, list[str]]
    placement: str
    latency_bytes: int
    latency_samples: int
    latency_p50_us: float
    latency_p99_us: float
    bandwidth_bytes: int
    bandwidth_gbps: float
    bandwidth_gbps_all: list[float]
    verified: bool


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]


async def probe_path(
    peer: str,
    config: KVTransportConfig,
    transport: str | None = None,
    *,
    latency_samples: int = 200,
    bandwidth_tokens: int = 4096,
    bandwidth_repeats: int = 3,
) -> PathReport:
    """Measure latency and bandwidth to the ``sage-transport serve`` at ``peer`` (``host:port``)."""
    transport = transport or config.backend
    small = await run_migration(
        model=LATENCY_MODEL, tokens=1, block_size=1, transport=transport, config=config, shuffle=False,
        repeats=latency_samples, peers=[peer], reference=False,
    )  # fmt: skip
    bulk = await run_migration(
        model=LATENCY_MODEL, tokens=bandwidth_tokens, block_size=16, transport=transport, config=config,
        repeats=bandwidth_repeats, peers=[peer], reference=False,
    )  # fmt: skip
    gib = [bulk.bytes / s / 1e9 for s in bulk.seconds_all]
    return PathReport(
        peer=peer, transport=transport, preset=config.preset, ucx_transports=bulk.ucx_transports or small.ucx_transports,
        placement=bulk.placement, latency_bytes=small.bytes, latency_samples=len(small.seconds_all),
        latency_p50_us=round(_percentile(small.seconds_all, 0.5) * 1e6, 1),
        latency_p99_us=round(_percentile(small.seconds_all, 0.99) * 1e6, 1),
        bandwidth_bytes=bulk.bytes, bandwidth_gbps=round(bulk.gbps, 3), bandwidth_gbps_all=[round(g, 3) for g in gib],
        verified=small.verified and bulk.verified,
    )  # fmt: skip
