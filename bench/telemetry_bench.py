"""Telemetry cost: migration bandwidth with telemetry on and off in the same run, and scrape time with 100 peers.

    .venv/bin/python bench/telemetry_bench.py --rounds 6 --out bench/results/telemetry

1. **Bandwidth**: ``migrate`` of Qwen2.5-7B, 8,192 tokens (448 MiB), shuffled destination, to a local receiver
   process over UCX, 3 transfers per run, alternating *on* (``telemetry=true``: per-chunk latency histograms,
   transfer histograms, a ``TelemetryServer`` serving the sender's metrics and a scraper thread reading
   ``/metrics`` every 100 ms, ten times Prometheus's usual rate) and *off* (``telemetry=false``, no server, no
   scrapes). Median GB/s of each over the rounds, and the ratio.
2. **Scrape**: one channel with 100 connected peers that each received a transfer (so every per-peer series and
   histogram is populated); ``GET /metrics`` over HTTP, 50 times, median and p99, and the time of the exposition
   alone (``generate_latest``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import structlog  # noqa: E402

from sage_transport import KVCacheSchema, KVMemory, KVTransferChannel, KVTransportConfig, TransferPlan  # noqa: E402
from sage_transport.migrate import Observe, run_migration  # noqa: E402
from sage_transport.telemetry.prometheus import SageCollector  # noqa: E402
from sage_transport.telemetry.server import TelemetryServer  # noqa: E402
from sage_transport.transports.mock import MockNetwork, MockTransport  # noqa: E402


def _scrape_loop(urls: list[str], stop: threading.Event, counted: list[int]) -> None:
    """Read ``/metrics`` every 100 ms once the server announced its URL."""
    while not stop.is_set():
        if urls:
            try:
                urllib.request.urlopen(urls[0] + "/metrics", timeout=5).read()
                counted.append(1)
            except OSError:
                pass
        stop.wait(0.1)


async def bandwidth(rounds: int, tokens: int) -> dict[str, Any]:
    runs: dict[str, list[float]] = {"on": [], "off": []}
    scrapes = 0
    for r in range(rounds):
        for mode in ("on", "off") if r % 2 == 0 else ("off", "on"):
            config = KVTransportConfig.resolve(f"telemetry={'true' if mode == 'on' else 'false'}", env={})
            urls: list[str] = []
            stop = threading.Event()
            counted: list[int] = []
            thread = threading.Thread(target=_scrape_loop, args=(urls, stop, counted), daemon=True)
            thread.start()
            observe = Observe(metrics_port=0, announce=urls.append) if mode == "on" else Observe()
            record = await run_migration(
                model="qwen2.5-7b", tokens=tokens, transport="ucx", config=config, repeats=3, reference=False, observe=observe
            )
            stop.set()
            thread.join()
            scrapes += len(counted)
            assert record.verified
            runs[mode].append(record.gbps)
            print(f"round {r + 1} {mode}: {record.gbps:.2f} GB/s", flush=True)
    on, off = statistics.median(runs["on"]), statistics.median(runs["off"])
    return {"runs": runs, "on_gbps": on, "off_gbps": off, "ratio": on / off, "scrapes": scrapes}


async def scrape(peers: int, samples: int) -> dict[str, Any]:
    from prometheus_client import generate_latest

    schema = KVCacheSchema(num_layers=4, num_kv_heads=2, head_dim=16, block_size=4)
    network = MockNetwork()
    config = KVTransportConfig(chunk_size=1024)
    async with KVTransferChannel(MockTransport(network, name="hub"), config, name="hub") as hub:
        hub.register(KVMemory.allocate(schema, 4))
        await hub.listen()
        others = [KVTransferChannel(MockTransport(network, name=f"p{i}"), config, name=f"p{i}") for i in range(peers)]
        try:
            for other in others:
                await other.__aenter__()
                other.register(KVMemory.allocate(schema, 4, fill=0))
            names = [await hub.connect(address_of) for address_of in [await o.listen() for o in others]]
            await asyncio.gather(
                *(
                    hub.transfer(TransferPlan.for_blocks(n, schema, range(4), range(4), transfer_id=f"t{i}"))
                    for i, n in enumerate(names)
                )
            )
            async with TelemetryServer(SageCollector([hub]), port=0) as server:
                http, expose = [], []
                size = 0
                for _ in range(samples):
                    start = time.perf_counter()
                    body = await asyncio.to_thread(lambda: urllib.request.urlopen(server.url + "/metrics", timeout=5).read())
                    http.append(time.perf_counter() - start)
                    size = len(body)
                    start = time.perf_counter()
                    generate_latest(server.registry)
                    expose.append(time.perf_counter() - start)
        finally:
            for other in others:
                await other.aclose()
    http.sort()
    expose.sort()
    return {
        "peers": peers, "samples": samples, "bytes": size,
        "http_ms_median": statistics.median(http) * 1e3, "http_ms_p99": http[int(0.99 * (len(http) - 1))] * 1e3,
        "expose_ms_median": statistics.median(expose) * 1e3, "expose_ms_p99": expose[int(0.99 * (len(expose) - 1))] * 1e3,
    }  # fmt: skip


async def main(args: argparse.Namespace) -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    result = {"scrape": await scrape(100, 50), "bandwidth": await bandwidth(args.rounds, args.tokens)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    b, s = result["bandwidth"], result["scrape"]
    text = (
        f"| telemetry | migrate GB/s, median of {args.rounds} runs (min–max) |\n|---|---|\n"
        f"| on (histograms, exporter, {b['scrapes']} scrapes at 10 Hz) "
        f"| {b['on_gbps']:.2f} ({min(b['runs']['on']):.2f}–{max(b['runs']['on']):.2f}) |\n"
        f"| off | {b['off_gbps']:.2f} ({min(b['runs']['off']):.2f}–{max(b['runs']['off']):.2f}) |\n"
        f"| ratio on / off | {b['ratio']:.3f} |\n\n"
        f"Scrape of one channel with {s['peers']} peers ({s['bytes']} bytes of exposition): GET /metrics median "
        f"{s['http_ms_median']:.1f} ms, p99 {s['http_ms_p99']:.1f} ms; generate_latest alone median "
        f"{s['expose_ms_median']:.1f} ms, p99 {s['expose_ms_p99']:.1f} ms ({s['samples']} samples).\n"
    )
    args.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/telemetry")
    import uvloop

    uvloop.run(main(parser.parse_args()))
