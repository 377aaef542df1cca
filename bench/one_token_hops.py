"""Where a one-token transfer's time goes: the transport's own round trip, then each hop of the channel's path.

    .venv/bin/python bench/one_token_hops.py [--transfers 2000] [--out bench/results/one_token_hops.md]

Two processes on this host over UCX (shared memory), uvloop, logging at warnings (as the CLI runs):

* **transport floor**: a `Connection` pair with no channel: a 56 KiB frame out, an 8-byte frame back, back to back
  (and 8 B out for the small-message floor);
* **channel**: `await channel.transfer(plan)` of one token of Qwen2.5-7B (56 pages of 1 KiB, a different block each
  time, shuffled destination, xxh3), back to back, p50/p90/p99;
* **hops**: the same run again with timestamps taken at the entry of each step on both sides (``perf_counter`` is
  the same clock in every process on a host), each reported as the median time since ``submit``.
  Timestamping costs a few microseconds per step, so the hops' total sits a little above the channel's p50.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import inspect
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STEPS = [  # (side, mark): in the order a transfer meets them
    ("sender", "submit"), ("sender", "send_chunk"), ("sender", "conn_send"), ("receiver", "sink"),
    ("receiver", "on_announce"), ("receiver", "on_chunk"), ("receiver", "flush_acks"), ("receiver", "conn_send"),
    ("sender", "on_control"), ("sender", "complete"), ("sender", "returned"),
]  # fmt: skip


def _quiet() -> None:
    import structlog

    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )


def _instrument(marks: dict[str, list[float]]) -> None:
    """Record the entry time of each step of the path (monkeypatched wrappers, this process only)."""
    from sage_transport import channel, channel_core, channel_receiving, channel_sending, session_receive, session_send
    from sage_transport.transports import ucx

    def wrap(cls: Any, name: str, mark: str) -> None:
        original = getattr(cls, name)
        if inspect.iscoroutinefunction(original):

            async def timed_async(*args: Any, **kwargs: Any) -> Any:
                marks[mark].append(time.perf_counter())
                return await original(*args, **kwargs)

            setattr(cls, name, timed_async)
        else:

            def timed(*args: Any, **kwargs: Any) -> Any:
                marks[mark].append(time.perf_counter())
                return original(*args, **kwargs)

            setattr(cls, name, timed)

    wrap(channel.KVTransferChannel, "submit", "submit")
    wrap(session_send.SendPath, "_send_chunk", "send_chunk")
    wrap(ucx.UcxConnection, "send", "conn_send")
    wrap(session_receive.ReceivePath, "_sink", "sink")
    wrap(channel_receiving.ReceivingSide, "_on_announce", "on_announce")
    wrap(session_receive.ReceivePath, "_on_chunk", "on_chunk")
    wrap(session_receive.ReceivePath, "_flush_acks", "flush_acks")
    wrap(channel_core.ChannelCore, "_on_control", "on_control")
    wrap(channel_sending.SendingSide, "_complete_outgoing", "complete")


def _schema() -> Any:
    from sage_transport import KVCacheSchema
    from sage_transport.schema import Layout

    return KVCacheSchema.for_model("qwen2.5-7b", block_size=1, layout=Layout.LAYER_KV_BLOCK)


async def _channel_receiver(instrumented: bool, marks_path: str) -> None:
    from sage_transport import KVMemory, KVTransferChannel

    marks: dict[str, list[float]] = collections.defaultdict(list)
    if instrumented:
        _instrument(marks)
    memory = KVMemory.allocate(_schema(), 64, fill=0)
    async with KVTransferChannel("ucx", name="receiver") as channel:
        channel.register(memory)
        print(json.dumps({"address": await channel.listen()}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # until the sender is done
    if instrumented:
        Path(marks_path).write_text(json.dumps(marks))  # noqa: ASYNC240 (once, after the run)


async def _transport_echo() -> None:
    from sage_transport.testing.conformance import PAIR_LIMITS
    from sage_transport.transports.registry import get_transport_class

    listener = await get_transport_class("ucx")().listen()
    print(json.dumps({"address": listener.address}), flush=True)
    conn = await listener.accept()
    await conn.authenticated(*PAIR_LIMITS)
    buffer = bytearray(1 << 20)
    while True:
        await conn.recv(lambda header, nbytes: memoryview(buffer)[:nbytes])
        await conn.send(b"ack")


async def _child(role: str, *extra: str) -> tuple[asyncio.subprocess.Process, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--role", role, *extra, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    assert process.stdout is not None
    return process, json.loads(await process.stdout.readline())["address"]


def _percentiles(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))] * 1e6  # noqa: E731
    return {"p50_us": pick(0.5), "p90_us": pick(0.9), "p99_us": pick(0.99)}


async def _transport_floor(frames: int) -> dict[str, dict[str, float]]:
    from sage_transport.testing.conformance import PAIR_LIMITS
    from sage_transport.transports.registry import get_transport_class

    process, address = await _child("echo")
    try:
        conn = await get_transport_class("ucx")().connect(address)
        await conn.authenticated(*PAIR_LIMITS)
        out = {}
        for size in (8, 57344):
            payload = bytes(size)
            seconds = []
            for _ in range(frames):
                start = time.perf_counter()
                await conn.send(b"h", payload)
                await conn.recv()
                seconds.append(time.perf_counter() - start)
            out[f"{size} B out, 8 B back"] = _percentiles(seconds[frames // 10 :])
        return out
    finally:
        process.kill()
        await process.wait()


async def _channel_run(transfers: int, instrumented: bool, marks_dir: Path) -> tuple[dict[str, float], dict[str, float]]:
    from sage_transport import KVMemory, KVTransferChannel, TransferPlan

    marks: dict[str, list[float]] = collections.defaultdict(list)
    if instrumented:
        _instrument(marks)
    receiver_marks = marks_dir / "receiver_marks.json"
    process, address = await _child("receiver", *(["--instrumented", str(receiver_marks)] if instrumented else []))
    schema = _schema()
    memory = KVMemory.allocate(schema, 64, fill=1)
    seconds = []
    try:
        async with KVTransferChannel("ucx", name="sender") as channel:
            channel.register(memory)
            peer = await channel.connect(address)
            for i in range(transfers):
                plan = TransferPlan.for_blocks(peer, schema, [i % 64], [(i * 7) % 64], transfer_id=f"t{i}")
                start = time.perf_counter()
                await channel.transfer(plan)
                marks["returned"].append(time.perf_counter())
                seconds.append(time.perf_counter() - start)
    finally:
        assert process.stdin is not None
        process.stdin.write(b"done\n")
        await process.stdin.drain()
        await process.wait()
    hops: dict[str, float] = {}
    if instrumented:
        other = json.loads(receiver_marks.read_text())
        sides = {"sender": marks, "receiver": other}
        for side, mark in STEPS:
            times = sorted(sides[side].get(mark, []))
            deltas = []
            for t0 in marks["submit"][transfers // 10 :]:
                k = bisect.bisect_left(times, t0)
                if k < len(times):
                    deltas.append((times[k] - t0) * 1e6)
            hops[f"{side}: {mark}"] = statistics.median(deltas) if deltas else float("nan")
    return _percentiles(seconds[transfers // 10 :]), hops


async def _main(transfers: int, out: Path) -> None:
    floor = await _transport_floor(transfers)
    plain, _ = await _channel_run(transfers, False, out.parent)
    timed, hops = await _channel_run(transfers, True, out.parent)
    lines = [
        "| what | p50 µs | p90 µs | p99 µs |",
        "|---|---|---|---|",
        *(f"| transport floor: {k} | {v['p50_us']:.1f} | {v['p90_us']:.1f} | {v['p99_us']:.1f} |" for k, v in floor.items()),
        f"| `channel.transfer`, one token | {plain['p50_us']:.1f} | {plain['p90_us']:.1f} | {plain['p99_us']:.1f} |",
        f"| the same, timestamped | {timed['p50_us']:.1f} | {timed['p90_us']:.1f} | {timed['p99_us']:.1f} |",
        "",
        "| step (entry) | median µs since submit |",
        "|---|---|",
        *(f"| {k} | {v:.1f} |" for k, v in hops.items()),
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"floor": floor, "channel": plain, "timed": timed, "hops": hops}, indent=1))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--transfers", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "one_token_hops")
    parser.add_argument("--role", choices=["bench", "receiver", "echo"], default="bench", help=argparse.SUPPRESS)
    parser.add_argument("--instrumented", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import uvloop

    _quiet()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        if args.role == "receiver":
            runner.run(_channel_receiver(bool(args.instrumented), args.instrumented))
        elif args.role == "echo":
            runner.run(_transport_echo())
        else:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            runner.run(_main(args.transfers, args.out))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
