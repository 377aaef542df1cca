"""Cross-host TCP at the link's speed (issue 23, part 5): two emulated hosts on a bridge, unshaped.

    sudo .venv/bin/python bench/tcp_streams_bench.py [--rounds 3] [--tokens 16384] [--out bench/results]

Two network namespaces, each on its own veth pair to one bridge (``sage_transport.testing.hosts``, no tc). Each
round runs, one after the other (the order rotates so that no row always goes first on a warm or a cold link):

* **raw 1** / **raw 2**: raw TCP sockets, 1 MiB ``sendall`` for 3 s, one stream / two at once (their sum): what
  the path carries, the limit;
* **ucx_perftest**: ``ucx_perftest -t tag_bw -s 4MiB`` over UCX's TCP between the two namespaces, the link
  reference the issue names;
* **sage tcp transport**: ``bench/link_bench.py``'s TCP row between the two hosts: 1 MiB frames from one buffer
  into one sink, 4 in flight (the transport alone: no plan, no checksum, no scatter);
* **sage tcp ×N**: ``sage-transport migrate --transport tcp --config connections_per_peer=N`` of ``--tokens`` of
  Qwen2.5-7B (shuffled destination, verified) to a ``sage-transport serve`` on the other host, N in 1, 2, 4.

Medians over the rounds, with min–max. Writes ``tcp_streams.json`` and ``tcp_streams.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sage_transport.testing.hosts import EmulatedHosts, stop_processes  # noqa: E402

TOKEN = "tcp-streams-bench-secret-Hq7Lm2Vx9Td4Pz"
ENV = {**os.environ, "SAGE_TRANSPORT_AUTH_TOKEN": TOKEN, "PYTHONPATH": str(ROOT)}
CLI = [sys.executable, "-m", "sage_transport.cli"]
PORT = 17500

_SOCKET = """
import socket, sys, threading, time
mode, host, port, streams = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if mode == "recv":
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((host, port)); s.listen(8)
    print("ready", flush=True)
    totals, spans = [0] * streams, [0.0] * streams
    def read(i, c):
        buf = bytearray(1 << 20); t = None
        while (n := c.recv_into(buf)):
            t = t or time.perf_counter(); totals[i] += n
        spans[i] = time.perf_counter() - t
    threads = [threading.Thread(target=read, args=(i, s.accept()[0])) for i in range(streams)]
    [t.start() for t in threads]; [t.join() for t in threads]
    print(sum(totals) / max(spans) / 1e9, flush=True)
else:
    def send():
        c = socket.create_connection((host, port)); data = bytes(1 << 20); end = time.time() + 3
        while time.time() < end: c.sendall(data)
        c.close()
    threads = [threading.Thread(target=send) for _ in range(streams)]
    [t.start() for t in threads]; [t.join() for t in threads]
"""


def raw(hosts: EmulatedHosts, streams: int) -> float:
    receiver = hosts.run(
        1, [sys.executable, "-c", _SOCKET, "recv", hosts.ip(1), str(PORT + 1), str(streams)], stdout=subprocess.PIPE, text=True
    )
    assert receiver.stdout is not None and receiver.stdout.readline().strip() == "ready"
    hosts.run(0, [sys.executable, "-c", _SOCKET, "send", hosts.ip(1), str(PORT + 1), str(streams)]).wait()
    rate = float(receiver.stdout.readline())
    receiver.wait()
    receiver.stdout.close()
    return rate


def perftest(hosts: EmulatedHosts) -> float:
    import libucx

    base = Path(libucx.__file__).parent
    env = {**os.environ, "LD_LIBRARY_PATH": str(base / "lib"), "UCX_TLS": "tcp"}
    binary = str(base / "bin" / "ucx_perftest")
    server = hosts.run(1, [binary, "-p", str(PORT + 2)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    size = 4 << 20
    done = subprocess.run(
        [*hosts.prefix(0), "env", f"LD_LIBRARY_PATH={env['LD_LIBRARY_PATH']}", "UCX_TLS=tcp", binary, hosts.ip(1),
         "-p", str(PORT + 2), "-t", "tag_bw", "-s", str(size), "-n", str((2 << 30) // size), "-w", "10"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    server.wait(timeout=30)
    final = [line for line in done.stdout.splitlines() if line.startswith("Final:")]
    if not final:
        raise RuntimeError(f"ucx_perftest printed no result: {done.stdout[-400:]} {done.stderr[-400:]}")
    return float(final[0].split()[5]) * (1 << 20) / 1e9  # its MB/s are MiB/s


def transport_row(hosts: EmulatedHosts, scratch: Path) -> float:
    out = scratch / "link"
    command = [
        *hosts.prefix(0), sys.executable, str(ROOT / "bench" / "link_bench.py"), "--netns", hosts.namespaces[1],
        "--host", hosts.ip(1), "--quick", "--only", "sage tcp", "--out", str(out),
    ]  # fmt: skip
    subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300, check=True)
    runs = json.loads(out.with_suffix(".json").read_text())["rows"]["sage tcp over veth"]["bw"][str(1 << 20)]
    return float(statistics.median(runs))


def migrate(hosts: EmulatedHosts, address: str, connections: int, tokens: int, scratch: Path) -> dict[str, Any]:
    out = scratch / f"migrate{connections}.json"
    command = [
        *hosts.prefix(0), *CLI, "migrate", "--peer", address, "--transport", "tcp", "--tokens", str(tokens),
        "--no-reference", "--repeat", "3", "--config", f"connections_per_peer={connections}", "--json", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"migrate failed: {done.stderr[-800:]}")
    record = json.loads(out.read_text())
    if not record["verified"] or record["connections"] != connections:
        raise RuntimeError(f"migrate with {connections} connections: verified={record['verified']}, {record['connections']}")
    return record


def main(args: argparse.Namespace) -> None:
    rows: dict[str, list[float]] = {}
    shares: dict[str, list[list[int]]] = {}
    cpu: dict[str, list[float]] = {}
    with EmulatedHosts(2) as hosts, tempfile.TemporaryDirectory() as scratch:
        server = hosts.run(
            1, [*CLI, "serve", "--host", hosts.ip(1), "--port", str(PORT)], env=ENV, stdout=subprocess.PIPE, text=True
        )
        try:
            assert server.stdout is not None
            line = server.stdout.readline()
            match = re.search(r"(\d+\.\d+\.\d+\.\d+:\d+)", line)
            address = match.group(1) if match else f"{hosts.ip(1)}:{PORT}"
            cases: list[tuple[str, Any]] = [
                ("raw socket, 1 stream", lambda: raw(hosts, 1)),
                ("raw sockets, 2 streams", lambda: raw(hosts, 2)),
                ("ucx_perftest tcp (4 MiB tag_bw)", lambda: perftest(hosts)),
                ("sage tcp transport (1 MiB frames)", lambda: transport_row(hosts, Path(scratch))),
            ]
            for n in (1, 2, 4):
                cases.append(
                    (f"sage tcp migrate, {n} connection(s)", lambda n=n: migrate(hosts, address, n, args.tokens, Path(scratch)))
                )
            for round_ in range(args.rounds):
                order = cases[round_ % len(cases) :] + cases[: round_ % len(cases)]
                for name, run in order:
                    value = run()
                    if isinstance(value, dict):
                        shares.setdefault(name, []).append(value["bytes_by_connection"])
                        cpu.setdefault(name, []).append(value["cpu_seconds_per_gib"].get("sender", float("nan")))
                        value = value["gbps"]
                    rows.setdefault(name, []).append(value)
                    print(f"round {round_ + 1}: {name}: {value:.2f} GB/s", file=sys.stderr, flush=True)
        finally:
            stop_processes([server])
    reference = statistics.median(rows["ucx_perftest tcp (4 MiB tag_bw)"])
    limit = statistics.median(rows["raw socket, 1 stream"])
    lines = [
        f"| what (GB/s over {args.rounds} rounds) | median (min–max) | ÷ ucx_perftest | ÷ raw 1 stream |",
        "|---|---|---|---|",
    ]
    for name, values in rows.items():
        median = statistics.median(values)
        lines.append(
            f"| {name} | {median:.2f} ({min(values):.2f}–{max(values):.2f}) | {median / reference:.2f} | {median / limit:.2f} |"
        )
    record = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(), "tokens": args.tokens, "rows": rows,
        "bytes_by_connection": shares, "sender_cpu_s_per_gib": cpu,
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tcp_streams.json").write_text(json.dumps(record, indent=1))
    (args.out / "tcp_streams.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    main(parser.parse_args())
