"""Hostile frames against a live channel, before and after the handshake, per transport (issue 18).

    python bench/adversary_bench.py --frames 1000000 --preauth 100000 --json bench/results/adversary.json

After the handshake: :func:`sage_transport.testing.adversary.fuzz` (survivable frames in batches closed by a
probe, fatal frames one at a time, reconnecting whenever the victim ends the session); every counted frame was
read by the victim. Before it: mutated ``Hello`` frames and random bytes, one connection each, on the listener's
port. Then the attacks' memory figures: RSS growth for one 2 GiB frame prefix and for 1,000 half-open
connections. The victim must end with ``internal_errors == 0``, no hang, and still serve a genuine peer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import struct
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from sage_transport import KVMemory, KVTransferChannel, KVTransportConfig  # noqa: E402
from sage_transport.memory import KVGeometry  # noqa: E402
from sage_transport.plan import BlockMapping  # noqa: E402
from sage_transport.schema import KVCacheSchema, Layout  # noqa: E402
from sage_transport.testing.adversary import Adversary, fuzz, half_open, hello_frame, raw_frames  # noqa: E402
from sage_transport.wire import Announce, Pull, Region  # noqa: E402

SCHEMA = KVCacheSchema(num_layers=4, num_kv_heads=2, head_dim=16, block_size=4)
TOKEN = "adversary-bench-token-Zq8Wm3Kx6Pv1Tn4"


def _rss() -> int:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _transport(kind: str) -> Any:
    if kind == "ucx":
        from sage_transport.transports.ucx import UcxTransport

        return UcxTransport()
    from sage_transport.transports.tcp import TcpTransport

    return TcpTransport()


async def _genuine_peer_served(kind: str, address: str, token: str | None) -> bool:
    transport = _transport(kind)
    try:
        region = Region(SCHEMA, KVGeometry(Layout.LAYER_KV_BLOCK, 16))
        async with Adversary(transport, address, region=region, token=token) as friend:
            await friend.send(Pull("genuine", SCHEMA, [BlockMapping(0, 4, (0, 1), (0, 1))], 0, 5.0))
            return isinstance(await friend.recv_until(Announce), Announce)
    finally:
        await transport.aclose()


async def run(kind: str, frames: int, preauth: int, seed: int) -> dict[str, Any]:
    out: dict[str, Any] = {"transport": kind}
    config = KVTransportConfig(chunk_size=1024, connect_timeout_s=0.5)
    async with KVTransferChannel(kind, config, name="victim") as victim:
        victim.register(KVMemory.allocate(SCHEMA, 16, fill=1))
        address = await victim.listen()
        transports: list[Any] = []

        def adversary() -> Adversary:
            transport = _transport(kind)
            transports.append(transport)
            return Adversary(transport, address, region=Region(SCHEMA, KVGeometry(Layout.LAYER_KV_BLOCK, 16)))

        report = await fuzz(adversary, frames, schema=SCHEMA, seed=seed, fatal_share=0.02)
        for transport in transports:
            await transport.aclose()
        out["after_handshake"] = {**report.__dict__, "frames_per_s": round(report.frames_per_s)}
        rng = random.Random(seed)
        hello = hello_frame()
        start = time.perf_counter()
        failures_before = victim.statistics().handshake_failures
        gate = asyncio.Semaphore(128)  # strangers at once, under max_pending_handshakes

        async def stranger(data: bytes) -> None:
            async with gate:
                await raw_frames(address, data, wait_s=10)  # returns once the victim closed the connection

        frames_sent = []
        for _ in range(preauth):
            data = bytearray(hello)
            if rng.random() < 0.7:
                for _ in range(rng.randint(1, 3)):
                    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            else:
                data = bytearray(rng.randbytes(rng.randint(1, 96)))
            frames_sent.append(bytes(data))
        await asyncio.gather(*(stranger(d) for d in frames_sent))
        took = time.perf_counter() - start
        stats = victim.statistics()
        out["before_handshake"] = {
            "connections": preauth,
            "closed_by_victim": stats.handshake_failures - failures_before,
            "seconds": round(took, 2),
            "per_s": round(preauth / took),
        }
        out["victim"] = {
            "internal_errors": stats.internal_errors,
            "protocol_errors": stats.protocol_errors,
            "handshake_failures": stats.handshake_failures,
            "transfers_refused": stats.transfers_refused,
        }
        out["genuine_peer_served"] = await _genuine_peer_served(kind, address, None)
    # the attacks' memory figures, on a listener that needs the token
    config = KVTransportConfig(chunk_size=1024, auth_token=TOKEN, connect_timeout_s=2.0)
    async with KVTransferChannel(kind, config, name="victim") as victim:
        victim.register(KVMemory.allocate(SCHEMA, 16, fill=1))
        address = await victim.listen()
        rss = _rss()
        await raw_frames(address, struct.pack("<IQ", 16, 2 << 30) + b"\x92" * 16)
        out["rss_growth_one_2GiB_prefix_bytes"] = _rss() - rss
        rss = _rss()
        writers = await half_open(address, 1000, prefix=struct.pack("<IQ", 64, 0))
        await asyncio.sleep(0.5)
        out["rss_growth_1000_half_open_bytes"] = _rss() - rss
        out["connections_refused"] = victim.statistics().connections_refused
        for writer in writers:
            writer.close()
        await asyncio.sleep(2.5)
        out["genuine_peer_served_after_flood"] = await _genuine_peer_served(kind, address, TOKEN)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=100_000, help="hostile frames after the handshake, per transport")
    parser.add_argument("--preauth", type=int, default=10_000, help="hostile connections before it, per transport")
    parser.add_argument("--transports", default="tcp,ucx")
    parser.add_argument("--seed", type=int, default=18)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))  # errors only: refusals are expected
    results = []
    for kind in args.transports.split(","):
        result = asyncio.run(run(kind, args.frames, args.preauth, args.seed))
        print(json.dumps(result), flush=True)
        results.append(result)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
