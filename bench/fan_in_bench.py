"""Fan-in priority (issue 23): a decode-critical transfer's completion time while six bulk senders feed the same
receiver, against its time alone, with the receiver's arbitration on and off.

    sudo python bench/fan_in_bench.py [--gbit 10] [--critical-blocks 64] [--bulk-blocks 256] [--runs 9]
                                      [--bulk-config peer_window=8] [--out bench/results]

Eight emulated hosts on a bridge, each link shaped both ways to ``--gbit`` (``sage_transport.testing.hosts``),
our TCP transport, Qwen2.5-7B pages (896 KiB a 16-token block). Host 0 receives; hosts 1..6 push bulk transfers
of ``--bulk-blocks`` back to back; host 7 pushes ``--critical-blocks`` at ``Priority.DECODE_CRITICAL`` ``--runs``
times, each timed from submit to verified. The critical figure alone (no bulk) is taken in the same sitting.
Writes ``fan_in.json`` and ``fan_in.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sage_transport.testing.hosts import EmulatedHosts, stop_processes  # noqa: E402

TOKEN = "fan-in-bench-shared-secret-Hd3Kp8Qz1Wt5"
ENV = {**os.environ, "SAGE_TRANSPORT_AUTH_TOKEN": TOKEN, "PYTHONPATH": str(ROOT)}
SENDERS = 7  # six bulk and one critical

_ROLE = """
import asyncio, json, sys, time
from sage_transport import KVCacheSchema, KVMemory, KVTransferChannel, KVTransportConfig, Priority, TransferPlan
role, ip, config, blocks = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
schema = KVCacheSchema.for_model("qwen2.5-7b")
async def main():
    loop = asyncio.get_running_loop()
    cfg = KVTransportConfig.resolve(f"listen_host={ip},{config}" if config else f"listen_host={ip}")  # + the env token
    if role == "receiver":
        memory = KVMemory.allocate(schema, blocks * 8, fill=0)  # blocks (the stride) for each of 8 senders
        async with KVTransferChannel("tcp", cfg, name="decode") as channel:
            channel.register(memory)
            print(json.dumps({"address": await channel.listen()}), flush=True)
            await loop.run_in_executor(None, sys.stdin.readline)
            print(json.dumps({"holds_sent": channel.statistics().holds_sent}), flush=True)
        return
    index, address, runs, stride = int(sys.argv[5]), sys.argv[6], int(sys.argv[7]), int(sys.argv[8])
    memory = KVMemory.allocate(schema, blocks, fill=index)
    async with KVTransferChannel("tcp", cfg, name=f"{role}-{index}") as channel:
        channel.register(memory)
        peer = await channel.connect(address)
        dst = range(index * stride, index * stride + blocks)  # each sender its own destination blocks
        if role == "bulk":
            print(json.dumps({"ready": True}), flush=True)
            stop = asyncio.ensure_future(loop.run_in_executor(None, sys.stdin.readline))
            n = 0
            while not stop.done():
                tid = f"b{index}-{n}"
                plan = TransferPlan.for_blocks(peer, schema, range(blocks), dst, priority=Priority.BULK, transfer_id=tid)
                await channel.transfer(plan)
                n += 1
            print(json.dumps({"transfers": n, "holds": channel.statistics().holds_received}), flush=True)
            return
        times = []
        for n in range(runs + 1):
            start = time.perf_counter()
            critical = Priority.DECODE_CRITICAL
            plan = TransferPlan.for_blocks(peer, schema, range(blocks), dst, priority=critical, transfer_id=f"c{index}-{n}")
            await channel.transfer(plan)
            times.append(time.perf_counter() - start)
            await asyncio.sleep(0.05)
        print(json.dumps({"seconds": times[1:]}), flush=True)
asyncio.run(main())
"""


def line(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    while True:
        text = proc.stdout.readline()
        if not text:
            raise RuntimeError("a role process ended early")
        if text.startswith("{"):
            return dict(json.loads(text))


def role(hosts: EmulatedHosts, host: int, *args: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-c", _ROLE, args[0], hosts.ip(host), *args[1:]]
    return hosts.run(host, command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV)


def sitting(hosts: EmulatedHosts, args: argparse.Namespace, fan_in: bool, bulk: bool) -> dict[str, Any]:
    blocks = max(args.bulk_blocks, args.critical_blocks)
    receiver = role(hosts, 0, "receiver", f"fan_in_priority={str(fan_in).lower()}", str(blocks))
    procs = [receiver]
    try:
        address = line(receiver)["address"]
        bulks = []
        if bulk:
            for i in range(1, SENDERS):
                bulks.append(role(hosts, i, "bulk", args.bulk_config, str(args.bulk_blocks), str(i), address, "0", str(blocks)))
            procs += bulks
            for proc in bulks:
                line(proc)
            time.sleep(1.0)  # the bulk transfers fill the receiver's link
        critical = role(
            hosts, SENDERS, "critical", "", str(args.critical_blocks), str(SENDERS), address, str(args.runs), str(blocks)
        )
        procs.append(critical)
        seconds = line(critical)["seconds"]
        holds = []
        for proc in bulks:
            assert proc.stdin is not None
            proc.stdin.write("stop\n")
            proc.stdin.flush()
            holds.append(line(proc)["holds"])
        assert receiver.stdin is not None
        receiver.stdin.write("quit\n")
        receiver.stdin.flush()
        sent = line(receiver)["holds_sent"]
    finally:
        for proc in procs:
            if proc.stdin is not None and not proc.stdin.closed:
                proc.stdin.close()
        stop_processes(procs)
    return {"ms": {"median": statistics.median(seconds) * 1e3, "min": min(seconds) * 1e3, "max": max(seconds) * 1e3,
                   "runs": len(seconds)}, "holds_received": holds, "holds_sent": sent}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gbit", type=float, default=10.0)
    parser.add_argument("--critical-blocks", type=int, default=64)
    parser.add_argument("--bulk-blocks", type=int, default=256)
    parser.add_argument("--bulk-config", default="", help="the bulk senders' settings (e.g. peer_window=2)")
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--queue-ms", type=float, default=50.0, help="each shaped link's queue (tc tbf latency)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    record: dict[str, Any] = {"gbit": args.gbit, "critical_blocks": args.critical_blocks, "bulk_blocks": args.bulk_blocks,
                              "bulk_config": args.bulk_config, "command": " ".join(sys.argv), "transport": "tcp"}  # fmt: skip
    record["queue_ms"] = args.queue_ms
    with EmulatedHosts(SENDERS + 1, rate_gbit=args.gbit, queue_ms=args.queue_ms) as hosts:
        record["alone"] = sitting(hosts, args, fan_in=True, bulk=False)
        record["with_bulk_arbitrated"] = sitting(hosts, args, fan_in=True, bulk=True)
        record["with_bulk_unarbitrated"] = sitting(hosts, args, fan_in=False, bulk=True)
    alone = record["alone"]["ms"]["median"]
    for case in ("with_bulk_arbitrated", "with_bulk_unarbitrated"):
        record[case]["ratio_to_alone"] = record[case]["ms"]["median"] / alone
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fan_in.json").write_text(json.dumps(record, indent=2))
    mib = args.critical_blocks * 917504 / (1 << 20)
    lines = [f"# Fan-in: one decode-critical transfer ({mib:.0f} MiB) among 6 bulk senders, {args.gbit:g} Gbit/s links, tcp",
             "", "| case | ms median (min-max) | × alone | holds sent |", "|---|---|---|---|"]  # fmt: skip
    for case in ("alone", "with_bulk_arbitrated", "with_bulk_unarbitrated"):
        r = record[case]
        ratio = r.get("ratio_to_alone", 1.0)
        lines.append(
            f"| {case} | {r['ms']['median']:.1f} ({r['ms']['min']:.1f}-{r['ms']['max']:.1f}) | {ratio:.2f} | {r['holds_sent']} |"
        )
    (args.out / "fan_in.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
