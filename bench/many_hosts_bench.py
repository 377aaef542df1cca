"""Fan-out and fan-in over emulated hosts found through one real etcd (issue 23), against the shaped links.

    sudo python bench/many_hosts_bench.py [--hosts 8] [--gbit 10] [--tokens 8192] [--repeat 3] [--out bench/results]

Eight network namespaces on a bridge, each host's link shaped both ways to ``--gbit`` with tc tbf
(``sage_transport.testing.hosts``), etcd on the bridge, one ``sage-transport serve --store`` per receiving host,
our TCP transport. In the same sitting:

* **link**: raw TCP between two hosts (one socket, 1 MiB ``sendall`` for 3 s, median of 3): what one shaped link
  carries, the reference next to the nominal rate;
* **fan-out**: host 0 migrates ``--tokens`` of Qwen2.5-7B to every decode registered (hosts 1..7) at once;
  aggregate = the bytes of all receivers / the median repeat's seconds, against the sender's link;
* **fan-in**: hosts 1..7 each migrate to the one decode on host 0 at once; aggregate = the sum of the seven
  senders' median rates (they start together and run the same bytes), against the receiver's link;
* **kill**: a fan-out to four decodes, one SIGKILLed while the cache moves: how long after the kill the sender
  noticed (its typed error; CLOCK_MONOTONIC on both sides) and how long until a watcher of the membership heard
  it leave (its lease's TTL: 3 s).

Writes ``many_hosts.json`` and ``many_hosts.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sage_transport.rendezvous import SERVE_PREFIX, open_store, watch_members  # noqa: E402
from sage_transport.testing.etcd import EtcdServer  # noqa: E402
from sage_transport.testing.hosts import EmulatedHosts, stop_processes  # noqa: E402

TOKEN = "many-hosts-bench-secret-Jw4Nc8Ry2Pk6"
ENV = {**os.environ, "SAGE_TRANSPORT_AUTH_TOKEN": TOKEN, "PYTHONPATH": str(ROOT)}
CLI = [sys.executable, "-m", "sage_transport.cli"]
TTL_S = 3

_SOCKET = """
import socket, sys, time
mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "recv":
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((host, port)); s.listen(1)
    print("ready", flush=True)
    c, _ = s.accept(); buf = bytearray(1 << 20); total = 0; t = None
    while (n := c.recv_into(buf)):
        t = t or time.perf_counter(); total += n
    print(total / (time.perf_counter() - t) / 1e9, flush=True)
else:
    c = socket.create_connection((host, port)); data = bytes(1 << 20); end = time.time() + 3
    while time.time() < end: c.sendall(data)
    c.close()
"""


def raw_link(hosts: EmulatedHosts, src: int, dst: int, port: int) -> float:
    receiver = hosts.run(
        dst, [sys.executable, "-c", _SOCKET, "recv", hosts.ip(dst), str(port)], stdout=subprocess.PIPE, text=True
    )
    assert receiver.stdout is not None and receiver.stdout.readline().strip() == "ready"
    hosts.run(src, [sys.executable, "-c", _SOCKET, "send", hosts.ip(dst), str(port)]).wait()
    rate = float(receiver.stdout.readline())
    receiver.wait()
    receiver.stdout.close()
    return rate


def serve(hosts: EmulatedHosts, host: int, etcd: EtcdServer, name: str) -> subprocess.Popen[str]:
    command = [*CLI, "serve", "--host", hosts.ip(host), "--store", etcd.url, "--name", name, "--ttl", str(TTL_S)]
    proc = hosts.run(host, command, stdout=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout is not None
    assert "listening on" in proc.stdout.readline() and "registered as" in proc.stdout.readline()
    return proc


def migrate(
    hosts: EmulatedHosts, host: int, etcd: EtcdServer, out: Path, tokens: int, repeat: int, *targets: str
) -> subprocess.Popen[str]:
    command = [*CLI, "migrate", "--store", etcd.url, *targets, "--transport", "tcp", "--tokens", str(tokens),
               "--repeat", str(repeat), "--no-reference", "--progress", "on", "--json", str(out)]  # fmt: skip
    return hosts.run(host, command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def finished(proc: subprocess.Popen[str], out: Path) -> dict[str, Any]:
    _, err = proc.communicate(timeout=600)
    if not out.exists():
        raise RuntimeError(f"migrate failed ({proc.returncode}): {err[-1500:]}")
    return dict(json.loads(out.read_text()))


async def leaves(url: str, name: str) -> float:
    """CLOCK_MONOTONIC when ``name`` leaves the serve membership, as a watcher hears it."""
    store = open_store(url)
    try:
        async for event in watch_members(store, SERVE_PREFIX, ttl_s=TTL_S):
            if event.kind == "left" and event.name == name:
                return time.monotonic()
        raise RuntimeError("the watch ended")
    finally:
        await store.close()


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=8)
    parser.add_argument("--gbit", type=float, default=10.0)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    link_gbs = args.gbit / 8
    record: dict[str, Any] = {"hosts": args.hosts, "gbit": args.gbit, "tokens": args.tokens, "repeat": args.repeat,
                              "command": " ".join(sys.argv), "transport": "tcp"}  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="sage-many-hosts-"))
    with EmulatedHosts(args.hosts, rate_gbit=args.gbit) as hosts, EtcdServer(hosts.bridge_ip) as etcd:
        record["link"] = spread([raw_link(hosts, 1, 0, 5201 + i) for i in range(3)])
        print("link", record["link"], flush=True)
        receivers = range(1, args.hosts)
        serves = [serve(hosts, host, etcd, f"decode-{host}") for host in receivers]
        try:
            fan_out = finished(
                migrate(hosts, 0, etcd, work / "out.json", args.tokens, args.repeat, "--to-all"), work / "out.json"
            )
        finally:
            stop_processes(serves)
        record["fan_out"] = {"gbps": fan_out["gbps"], "min": fan_out["gbps_min"], "max": fan_out["gbps_max"],
                             "receivers": len(fan_out["peers"]), "verified": fan_out["verified"],
                             "ratio_to_link_rate": fan_out["gbps"] / link_gbs}  # fmt: skip
        print("fan_out", record["fan_out"], flush=True)
        decode = serve(hosts, 0, etcd, "decode-main")
        try:
            outs = [work / f"in-{host}.json" for host in receivers]
            procs = [
                migrate(hosts, host, etcd, out, args.tokens, args.repeat, "--to", "decode-main")
                for host, out in zip(receivers, outs)
            ]
            fan_in = [finished(proc, out) for proc, out in zip(procs, outs)]
        finally:
            stop_processes([decode])
        total = sum(r["gbps"] for r in fan_in)
        record["fan_in"] = {"gbps": total, "per_sender": [r["gbps"] for r in fan_in], "senders": len(fan_in),
                            "verified": all(r["verified"] for r in fan_in), "ratio_to_link_rate": total / link_gbs}  # fmt: skip
        print("fan_in", record["fan_in"], flush=True)
        serves = [serve(hosts, host, etcd, f"kill-{host}") for host in range(1, 5)]
        try:
            out = work / "kill.json"
            proc = migrate(hosts, 0, etcd, out, args.tokens, 4, "--to-all")
            assert proc.stderr is not None
            while "moving the cache" not in (text := proc.stderr.readline()):
                if not text:
                    raise RuntimeError("migrate ended before it moved anything")
            left: list[float] = []
            watcher = threading.Thread(target=lambda: left.append(asyncio.run(leaves(etcd.url, "kill-2"))), daemon=True)
            watcher.start()  # watching before the kill: etcd tells when the lease expires
            time.sleep(0.5)
            serves[1].send_signal(signal.SIGKILL)
            killed = time.monotonic()
            kill = finished(proc, out)
            watcher.join(timeout=60)
            gone_s = left[0] - killed if left else None
        finally:
            stop_processes(serves)
        noticed = list(kill["failed_at"].values())
        record["kill"] = {"failed": kill["failed"], "noticed_ms": (noticed[0] - killed) * 1e3 if noticed else None,
                          "gone_from_etcd_s": gone_s, "ttl_s": TTL_S, "others_verified": kill["verified"]}  # fmt: skip
        print("kill", record["kill"], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "many_hosts.json").write_text(json.dumps(record, indent=2))
    title = f"# {args.hosts} emulated hosts at {args.gbit:g} Gbit/s each ({link_gbs:.3f} GB/s)"
    fan_out_r, fan_in_r = record["fan_out"], record["fan_in"]
    rows = [
        ("raw TCP over one shaped link (median of 3)", record["link"]["median"], "nominal"),
        (f"fan-out 1 → {fan_out_r['receivers']} (median of {args.repeat})", fan_out_r["gbps"], "sender's link"),
        (f"fan-in {fan_in_r['senders']} → 1 (sum of medians)", fan_in_r["gbps"], "receiver's link"),
    ]
    lines = [
        f"{title}, etcd, tcp, {args.tokens} tokens of qwen2.5-7b",
        "",
        "| what | GB/s | against | ratio |",
        "|---|---|---|---|",
    ]
    lines += [f"| {what} | {gbs:.3f} | {against} {link_gbs:.3f} | {gbs / link_gbs:.2f} |" for what, gbs, against in rows]
    lines += ["", f"kill: {record['kill']}"]
    (args.out / "many_hosts.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
