"""``TelemetryServer``: one small HTTP server beside the work, owned by an ``async with``:

- ``GET /metrics``: Prometheus exposition of a :class:`~.prometheus.SageCollector` (its own registry);
- ``GET /summary``: JSON for a gateway card: bandwidth, latency p50/p99, communication share of step time,
  failure rate, transports per peer;
- ``GET /control``: the live settings; ``POST /control`` changes them (``chunk_size``, ``peer_window``,
  ``max_inflight``, ``send_lanes``, ``ack_timeout_s``, ``telemetry`` on channels; ``fusion`` and ``overlap``
  on collective backends). A change needs ``Authorization: Bearer <auth_token>``; without a token configured the
  control plane is closed.

The port comes from the argument, else ``SAGE_TRANSPORT_METRICS_PORT``, else a free one (``server.port`` says).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import time
from collections.abc import Mapping
from typing import Any

import msgspec
import structlog

from ..collectives.overlap import check_overlap
from ..config import canonical_key
from ..errors import ConfigError
from ..ports import port_from_env
from ..units import parse_duration, parse_size
from .prometheus import SageCollector

__all__ = ["TelemetryServer"]

log = structlog.get_logger("sage_transport.telemetry")

_MAX_HEAD = 16 << 10
_MAX_BODY = 64 << 10
_BANDWIDTH_WINDOW_S = 10.0


class TelemetryServer:
    """Serves ``/metrics``, ``/summary`` and ``/control`` for ``collector``'s channels and backends."""

    def __init__(
        self,
        collector: SageCollector,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        auth_token: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        from prometheus_client import CollectorRegistry

        self.collector = collector
        self.host = host
        env = os.environ if env is None else env
        chosen = port if port is not None else port_from_env(env, ("SAGE_TRANSPORT_METRICS_PORT",))
        self.port = chosen if chosen is not None else 0
        self.auth_token = auth_token
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)  # type: ignore[arg-type]
        self._server: asyncio.Server | None = None
        self._samples: dict[str, list[tuple[float, int]]] = {}
        self._started = time.perf_counter()
        self.requests = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def __aenter__(self) -> TelemetryServer:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        self._started = time.perf_counter()
        log.info("telemetry.listening", url=self.url)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    # ---- HTTP ---------------------------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                status, ctype, body = await self._respond(reader)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            status, ctype, body = 400, "text/plain", b"bad request\n"
        except Exception as exc:  # a bug answering one request: that request gets a 500, the socket still closes
            log.warning("telemetry.request_failed", error=repr(exc))
            status, ctype, body = 500, "text/plain", b"internal error\n"
        try:
            reason = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
                      500: "Internal Server Error"}.get(status, "Error")  # fmt: skip
            head = (
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _respond(self, reader: asyncio.StreamReader) -> tuple[int, str, bytes]:
        head = await reader.readuntil(b"\r\n\r\n")
        if len(head) > _MAX_HEAD:
            return 400, "text/plain", b"request head too large\n"
        lines = head.decode("latin-1").split("\r\n")
        method, _, rest = lines[0].partition(" ")
        path = rest.split(" ", 1)[0].split("?", 1)[0]
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if ":" in line)}
        self.requests += 1
        if method == "GET" and path == "/metrics":
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if method == "GET" and path == "/summary":
            return 200, "application/json", msgspec.json.encode(self.summary())
        if path == "/control":
            if method == "GET":
                return 200, "application/json", msgspec.json.encode(self.settings())
            if method == "POST":
                text = headers.get("content-length", "0") or "0"
                if not text.isdigit():
                    return 400, "text/plain", f"Content-Length={text[:40]!r} is not a byte count\n".encode()
                length = int(text)
                if length > _MAX_BODY:
                    return 400, "text/plain", b"body too large\n"
                body = await reader.readexactly(length) if length else b""
                return self._control(headers, body)
        return 404, "text/plain", b"not found: GET /metrics, GET /summary, GET|POST /control\n"

    # ---- control ------------------------------------------------------------------------------------------

    def _control(self, headers: Mapping[str, str], body: bytes) -> tuple[int, str, bytes]:
        if not self.auth_token:
            return 403, "text/plain", b"the control plane is closed: start the server with an auth_token\n"
        given = headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not token or not hmac.compare_digest(token.encode(), self.auth_token.encode()):
            return 401, "text/plain", b"missing or wrong token: send Authorization: Bearer <auth_token>\n"
        try:
            changes = json.loads(body or b"{}")
            if not isinstance(changes, dict):
                raise ConfigError("the body must be a JSON object of settings")
            self.apply(changes)
        except (ConfigError, ValueError, TypeError) as exc:
            return 400, "text/plain", f"{exc}\n".encode()
        return 200, "application/json", msgspec.json.encode(self.settings())

    def apply(self, changes: dict[str, Any]) -> None:
        """Apply ``changes`` (the ``/control`` body): channel settings to the channels (all, or the one named by
        ``channel``), ``fusion`` and ``overlap`` to the collective backends. Validates everything first."""
        changes = dict(changes)
        target = changes.pop("channel", None)
        fusion = changes.pop("fusion", None)
        overlap = changes.pop("overlap", None)
        channels = [c for c in self.collector.channels if target is None or c.name == target]
        if target is not None and not channels:
            raise ConfigError(
                f"channel={target!r} is not served here; channels: {', '.join(c.name for c in self.collector.channels)}"
            )
        if changes and not channels:
            raise ConfigError("no channel is served here to change")
        if (fusion is not None or overlap is not None) and not self.collector.comm:
            raise ConfigError("no collective backend is served here: fusion and overlap have nothing to change")
        policy = _fusion_policy(fusion, self.collector.comm[0].fusion_policy) if fusion is not None else None
        if overlap is not None:
            check_overlap(overlap)
        for channel in channels:  # validate on a copy first so a bad key or value changes nothing anywhere
            for key in map(canonical_key, changes):
                if key not in channel.LIVE_SETTINGS:
                    raise ConfigError(
                        f"{key!r} cannot change on a live channel; live settings: {', '.join(channel.LIVE_SETTINGS)}"
                    )
            channel.config.replace(**changes)
        for channel in channels:
            if changes:
                channel.reconfigure(**changes)
        for backend in self.collector.comm:
            backend.set_policy(fusion=policy, overlap=overlap)
        log.info("telemetry.control", changes={**changes, **({"fusion": fusion} if fusion is not None else {}),
                                               **({"overlap": overlap} if overlap is not None else {})})  # fmt: skip

    def settings(self) -> dict[str, Any]:
        channels = {c.name: {k: _plain(getattr(c.config, k)) for k in c.LIVE_SETTINGS} for c in self.collector.channels}
        comm = [
            {
                "backend": b.name,
                "rank": b.rank,
                "fusion": msgspec.to_builtins(b.fusion_policy),
                "overlap": b.get_stats().overlap.limit,
            }
            for b in self.collector.comm
        ]
        return {"channels": channels, "collectives": comm}

    # ---- summary ------------------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """The gateway card's numbers (see the module docstring)."""
        now = time.perf_counter()
        channels = []
        for channel in self.collector.channels:
            stats = channel.statistics()
            moved = stats.bytes_sent + stats.bytes_received
            samples = self._samples.setdefault(channel.name, [(self._started, 0)])
            samples.append((now, moved))
            while len(samples) > 2 and now - samples[1][0] > _BANDWIDTH_WINDOW_S:
                samples.pop(0)
            t0, b0 = samples[0]
            hists = channel.histograms()
            finished = stats.transfers_completed + stats.transfers_failed
            links = channel.links()
            channels.append(
                {
                    "name": channel.name,
                    "bandwidth_bytes_per_s": (moved - b0) / (now - t0) if now > t0 else 0.0,
                    "bytes_sent": stats.bytes_sent,
                    "bytes_received": stats.bytes_received,
                    "transfers_completed": stats.transfers_completed,
                    "transfers_failed": stats.transfers_failed,
                    "failure_rate": stats.transfers_failed / finished if finished else 0.0,
                    "chunk_latency_p50_s": hists["chunk_latency_seconds"].quantile(0.5),
                    "chunk_latency_p99_s": hists["chunk_latency_seconds"].quantile(0.99),
                    "transfer_latency_p50_s": hists["transfer_sent_seconds"].quantile(0.5),
                    "transfer_latency_p99_s": hists["transfer_sent_seconds"].quantile(0.99),
                    "inflight_bytes": stats.inflight_bytes,
                    "peers": [
                        {
                            "peer": p.peer,
                            "transport": p.transport,
                            "placement": p.placement,
                            "ucx_transports": links.get(p.peer, {}).get("ucx_transports", {}),
                        }
                        for p in channel.peer_statistics()
                    ],
                    "config": {k: _plain(getattr(channel.config, k)) for k in channel.LIVE_SETTINGS},
                }
            )
        telemetry = self.collector._telemetry()
        steps = msgspec.to_builtins(telemetry.statistics()) if telemetry is not None else None
        recent = sorted(telemetry.recent_transfer_seconds) if telemetry is not None else []
        return {
            "channels": channels,
            "steps": steps,
            "comm_share": steps["last_step_comm_share"] if steps else 0.0,
            "recent_transfers": {
                "count": len(recent),
                "p50_s": recent[len(recent) // 2] if recent else 0.0,
                "p99_s": recent[min(len(recent) - 1, int(len(recent) * 0.99))] if recent else 0.0,
            },
            "collectives": [msgspec.to_builtins(b.get_stats()) for b in self.collector.comm],
        }


def _plain(value: Any) -> Any:
    return getattr(value, "value", value)


def _fusion_policy(value: Any, current: Any) -> Any:
    from ..collectives.fusion import CommFusion

    if isinstance(value, bool):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"fusion={value!r} must be true, false or an object of enabled/bucket_bytes/window_s/max_tensors")
    fields = msgspec.structs.asdict(current)
    for key, raw in value.items():
        if key not in fields:
            raise ConfigError(f"fusion: unknown key {key!r}; known: {', '.join(fields)}")
        if key == "bucket_bytes":
            fields[key] = parse_size(raw, "fusion.bucket_bytes")
        elif key == "window_s":
            fields[key] = parse_duration(raw, "fusion.window_s")
        elif key == "enabled":
            if not isinstance(raw, bool):
                raise ConfigError(f"fusion.enabled={raw!r} must be true or false")
            fields[key] = raw
        else:
            fields[key] = raw
    return CommFusion(**fields)
