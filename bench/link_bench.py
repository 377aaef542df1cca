"""Link benchmark: bandwidth (64 KiB–64 MiB) and one-way latency (8 B–64 KiB, p50/p99) between two processes,
for sage_transport's connections, raw ucxx and ucx_perftest, in one run. Writes JSON, Markdown and a PNG.

    .venv/bin/python bench/link_bench.py --out bench/results/link

Every row runs in a fresh pair of processes (this one and a child started with ``--serve``). Bandwidth: the
sender keeps ``inflight`` frames in flight (concurrent ``send`` calls) of one reused payload, the receiver
lands each in one preallocated buffer (a sink); 3 runs, median and range. Latency: ping-pong, one-way = half
the round trip, 8 B is a header-only control frame. CPU seconds are this process's (the sender's) per GiB.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import struct
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sage_transport.errors import ConnectionClosedError, PeerDeadError  # noqa: E402
from sage_transport.transports.registry import get_transport_class  # noqa: E402

BW_SIZES = [64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20]
LAT_SIZES = [8, 256, 4096, 65536]
BW_BYTES = 1 << 30  # per run
LAT_ROUNDS = 3000


def cpu() -> float:
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


# ---- sage_transport connections ------------------------------------------------------------------------


async def serve_sage(transport: str, options: dict[str, Any]) -> None:
    t = get_transport_class(transport)(**options)
    listener = await t.listen()
    print(listener.address, flush=True)
    conn = await listener.accept()
    await conn.authenticated(1 << 16, max(BW_SIZES))  # no handshake here: open the limits a channel's would
    target = bytearray(max(BW_SIZES))
    view = memoryview(target)

    def sink(header: bytes, nbytes: int) -> Any:
        return view[:nbytes]

    marks = [cpu()]  # receiver CPU at each bandwidth run's end, reported on exit
    try:
        while True:
            frame = await conn.recv(sink)
            if frame.header == b"end":
                marks.append(cpu())
                await conn.send(b"ok")
            elif frame.header.startswith(b"ping"):
                await conn.send(frame.header, frame.payload)
    except (PeerDeadError, ConnectionClosedError):
        pass  # the sender is done
    finally:
        await conn.aclose()
        await t.aclose()
        print(json.dumps(marks), flush=True)


CHILD_PREFIX: list[str] = []  # e.g. ["ip", "netns", "exec", "B"]: run the receiving side in another namespace


async def spawn(args: list[str], env: dict[str, str] | None = None) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        *CHILD_PREFIX,
        sys.executable,
        __file__,
        "--serve",
        *args,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    assert proc.stdout is not None
    line = (await proc.stdout.readline()).decode().strip()
    return proc, line


async def sage_row(
    transport: str,
    options: dict[str, Any],
    sizes: list[int],
    lat_sizes: list[int],
    inflight: int,
    lat_gap_s: float = 0.0,
    lat_rounds: int = LAT_ROUNDS,
) -> dict[str, Any]:
    """One row; ``lat_gap_s`` idles between pings (untimed) so progress engines that sleep when idle pay
    their wake-up, as between decode steps."""
    proc, address = await spawn(["sage", transport, json.dumps(options)])
    options = {k: v for k, v in options.items() if k != "host"}
    t = get_transport_class(transport)(**options)
    conn = await t.connect(address)
    await conn.authenticated(1 << 16, max(BW_SIZES))
    info = conn.link_info()
    payload = bytearray(os.urandom(1 << 20)) * (max(sizes) >> 20) if sizes else bytearray(0)
    view = memoryview(payload)
    bw: dict[int, list[float]] = {}
    cpu_per_gib: dict[int, float] = {}
    try:
        for size in sizes:
            count = max(8, BW_BYTES // size)
            runs = []
            c0 = cpu()
            for _ in range(3):
                start = time.perf_counter()
                queue = iter(range(count))
                await asyncio.gather(*(_send_all(conn, queue, view[:size]) for _ in range(inflight)))
                await conn.send(b"end")
                frame = await conn.recv()
                assert frame.header == b"ok"
                runs.append(size * count / (time.perf_counter() - start) / 1e9)
            bw[size] = runs
            cpu_per_gib[size] = (cpu() - c0) / (3 * size * count / (1 << 30))
        lat: dict[int, dict[str, float]] = {}
        for size in lat_sizes:
            samples = []
            body = None if size <= 8 else bytes(size)
            header = b"ping" + b"\0" * 4 if size <= 8 else b"ping"
            for i in range(lat_rounds + 200):
                if lat_gap_s:
                    await asyncio.sleep(lat_gap_s)
                start = time.perf_counter_ns()
                await conn.send(header, body)
                await conn.recv()
                if i >= 200:
                    samples.append((time.perf_counter_ns() - start) / 2000)
            samples.sort()
            lat[size] = {"p50": samples[len(samples) // 2], "p99": samples[int(len(samples) * 0.99)]}
    finally:
        await conn.aclose()
        await t.aclose()
        assert proc.stdout is not None
        tail = (await asyncio.wait_for(proc.stdout.read(), 30)).decode().strip().splitlines()
        await asyncio.wait_for(proc.wait(), 30)
    marks = json.loads(tail[-1]) if tail else []
    rx_cpu_per_gib: dict[int, float] = {}
    for i, size in enumerate(sizes):  # three runs per size, one mark after each
        if len(marks) > 3 * i + 3:
            count = max(8, BW_BYTES // size)
            rx_cpu_per_gib[size] = (marks[3 * i + 3] - marks[3 * i]) / (3 * size * count / (1 << 30))
    return {"bw": bw, "cpu_per_gib": cpu_per_gib, "rx_cpu_per_gib": rx_cpu_per_gib, "lat": lat, "link": info}


async def _send_all(conn: Any, queue: Any, payload: memoryview) -> None:
    for _ in queue:
        await conn.send(b"d", payload)


# ---- raw sockets (the link's limit: blocking sendall / recv_into, no framing) ----------------------------


def serve_socket(host: str) -> None:
    """Accept connections one at a time and read each to its end into one buffer (killed by the sender)."""
    import socket

    server = socket.create_server((host, 0))
    print(f"{host}:{server.getsockname()[1]}", flush=True)
    view = memoryview(bytearray(max(BW_SIZES)))
    while True:
        conn, _ = server.accept()
        with conn:
            while conn.recv_into(view):
                pass


async def socket_row(address: str, sizes: list[int]) -> dict[str, Any]:
    """Raw TCP over the same path: one socket per run, ``sendall`` of ``size`` from one buffer until
    ``BW_BYTES`` moved (timed until the receiver has closed its end, so every byte arrived)."""
    import socket

    host, port = address.rsplit(":", 1)
    payload = memoryview(bytearray(os.urandom(1 << 20)) * (max(sizes) >> 20))
    bw: dict[int, list[float]] = {}
    cpu_per_gib: dict[int, float] = {}

    def one_run(size: int) -> float:
        count = max(8, BW_BYTES // size)
        with socket.create_connection((host, int(port))) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            start = time.perf_counter()
            for _ in range(count):
                sock.sendall(payload[:size])
            sock.shutdown(socket.SHUT_WR)
            sock.recv(1)  # the receiver closes after reading everything
            return size * count / (time.perf_counter() - start) / 1e9

    for size in sizes:
        c0 = cpu()
        bw[size] = [await asyncio.to_thread(one_run, size) for _ in range(3)]
        cpu_per_gib[size] = (cpu() - c0) / (3 * size * max(8, BW_BYTES // size) / (1 << 30))
    return {"bw": bw, "cpu_per_gib": cpu_per_gib, "rx_cpu_per_gib": {}, "lat": {}, "link": {"transport": "socket"}}


async def socket_row_in_child(host: str, sizes: list[int]) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        *CHILD_PREFIX, sys.executable, __file__, "--serve", "socket", host, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    address = (await proc.stdout.readline()).decode().strip()
    try:
        return await socket_row(address, sizes)
    finally:
        proc.kill()
        await proc.wait()


# ---- raw ucxx (worker-address endpoints, no peer error handling, polling progress) ----------------------


async def serve_raw(tls: str) -> None:
    from ucxx._lib import libucxx as L
    from ucxx._lib.arr import Array

    ctx = L.UCXContext({"TLS": tls}, feature_flags=(L.Feature.TAG, L.Feature.WAKEUP))
    w = L.UCXWorker(ctx, enable_delayed_submission=False, enable_python_future=False)
    print("started", flush=True)
    reader, writer = await asyncio.open_connection(*sys.argv[-1].rsplit(":", 1))
    addr = w.address.tobytes()
    writer.write(struct.pack("<I", len(addr)) + addr)
    await writer.drain()
    (n,) = struct.unpack("<I", await reader.readexactly(4))
    ep = L.UCXEndpoint.create_from_worker_address(w, L.UCXAddress.create_from_buffer(await reader.readexactly(n)), False)
    target = bytearray(max(BW_SIZES))
    small = bytearray(max(LAT_SIZES))
    ctl = bytearray(16)

    async def wait(req: Any) -> None:
        while not req.completed:
            w.progress()
            await asyncio.sleep(0)
        req.check_error()

    while True:
        await wait(w.tag_recv(Array(ctl), L.UCXXTag(1)))
        op, size, count = struct.unpack("<IIQ", ctl[:16])
        if op == 0:
            break
        if op == 1:  # bandwidth: count messages of size
            arr = Array(memoryview(target)[:size])
            reqs = [w.tag_recv(arr, L.UCXXTag(2)) for _ in range(count)]
            for r in reqs:
                await wait(r)
            ok = Array(b"ok")
            await wait(ep.tag_send(ok, L.UCXXTag(3)))
        else:  # ping-pong
            arr = Array(memoryview(small)[:size])
            for _ in range(count):
                await wait(w.tag_recv(arr, L.UCXXTag(4)))
                await wait(ep.tag_send(arr, L.UCXXTag(5)))


async def raw_row(tls: str, sizes: list[int], lat_sizes: list[int], inflight: int) -> dict[str, Any]:
    from ucxx._lib import libucxx as L
    from ucxx._lib.arr import Array

    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    server.close()
    bootstrap: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.get_running_loop().create_future()

    async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        bootstrap.set_result((r, w))

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    proc, _ = await spawn(["raw", tls, f"127.0.0.1:{port}"])
    ctx = L.UCXContext({"TLS": tls}, feature_flags=(L.Feature.TAG, L.Feature.WAKEUP))
    w = L.UCXWorker(ctx, enable_delayed_submission=False, enable_python_future=False)
    reader, writer = await bootstrap
    (n,) = struct.unpack("<I", await reader.readexactly(4))
    peer = await reader.readexactly(n)
    addr = w.address.tobytes()
    writer.write(struct.pack("<I", len(addr)) + addr)
    await writer.drain()
    ep = L.UCXEndpoint.create_from_worker_address(w, L.UCXAddress.create_from_buffer(peer), False)

    async def wait(req: Any) -> None:
        while not req.completed:
            w.progress()
            await asyncio.sleep(0)
        req.check_error()

    payload = bytearray(os.urandom(1 << 20)) * (max(sizes) >> 20) if sizes else bytearray(0)
    bw: dict[int, list[float]] = {}
    cpu_per_gib: dict[int, float] = {}
    for size in sizes:
        count = max(8, BW_BYTES // size)
        runs = []
        c0 = cpu()
        arr = Array(memoryview(payload)[:size])
        for _ in range(3):
            start = time.perf_counter()
            command = Array(struct.pack("<IIQ", 1, size, count))
            await wait(ep.tag_send(command, L.UCXXTag(1)))
            pending: list[Any] = []
            for _ in range(count):
                pending.append(ep.tag_send(arr, L.UCXXTag(2)))
                if len(pending) >= inflight:
                    await wait(pending.pop(0))
            for r in pending:
                await wait(r)
            ack = Array(bytearray(2))  # referenced until the receive completes
            await wait(w.tag_recv(ack, L.UCXXTag(3)))
            runs.append(size * count / (time.perf_counter() - start) / 1e9)
        bw[size] = runs
        cpu_per_gib[size] = (cpu() - c0) / (3 * size * count / (1 << 30))
    lat: dict[int, dict[str, float]] = {}
    for size in lat_sizes:
        arr = Array(bytearray(size))
        command = Array(struct.pack("<IIQ", 2, size, LAT_ROUNDS + 200))
        await wait(ep.tag_send(command, L.UCXXTag(1)))
        samples = []
        for i in range(LAT_ROUNDS + 200):
            start = time.perf_counter_ns()
            await wait(ep.tag_send(arr, L.UCXXTag(4)))
            await wait(w.tag_recv(arr, L.UCXXTag(5)))
            if i >= 200:
                samples.append((time.perf_counter_ns() - start) / 2000)
        samples.sort()
        lat[size] = {"p50": samples[len(samples) // 2], "p99": samples[int(len(samples) * 0.99)]}
    command = Array(struct.pack("<IIQ", 0, 0, 0))
    await wait(ep.tag_send(command, L.UCXXTag(1)))
    await asyncio.wait_for(proc.wait(), 30)
    writer.close()
    server.close()
    return {"bw": bw, "cpu_per_gib": cpu_per_gib, "lat": lat, "link": {"ucx_tls": tls}}


# ---- ucx_perftest ----------------------------------------------------------------------------------------


async def perftest_row(tls: str, sizes: list[int], lat_sizes: list[int]) -> dict[str, Any]:
    from sage_transport.perftest import measure_link

    bw: dict[int, list[float]] = {}
    for size in sizes:
        bw[size] = [(await measure_link(size, ucx_tls=tls)).gbps for _ in range(3)]
    lat: dict[int, dict[str, float]] = {}
    for size in lat_sizes:
        ref = await measure_link(size, ucx_tls=tls, test="tag_lat", iterations=20000)
        lat[size] = {"p50": ref.latency_us, "p99": float("nan")}
    return {"bw": bw, "cpu_per_gib": {}, "lat": lat, "link": {"ucx_tls": tls}}


# ---- report ----------------------------------------------------------------------------------------------


def fmt_size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB" if n >= 1 << 10 else f"{n} B"


def markdown(rows: dict[str, dict[str, Any]], sizes: list[int], lat_sizes: list[int]) -> str:
    out = ["| bandwidth GB/s, median (min–max) | " + " | ".join(fmt_size(s) for s in sizes) + " |"]
    out.append("|---|" + "---|" * len(sizes))
    for name, row in rows.items():
        cells = []
        for s in sizes:
            runs = row["bw"].get(s)
            cells.append(f"{statistics.median(runs):.2f} ({min(runs):.2f}–{max(runs):.2f})" if runs else "")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    out += [
        "",
        "| CPU s per GiB, sender / receiver | " + " | ".join(fmt_size(s) for s in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    for name, row in rows.items():
        if row["cpu_per_gib"]:
            rx = row.get("rx_cpu_per_gib", {})
            cells = [f"{row['cpu_per_gib'].get(s, float('nan')):.3f}" + (f" / {rx[s]:.3f}" if s in rx else "") for s in sizes]
            out.append(f"| {name} | " + " | ".join(cells) + " |")
    out += ["", "| one-way latency µs, p50 / p99 | " + " | ".join(fmt_size(s) for s in lat_sizes) + " |"]
    out.append("|---|" + "---|" * len(lat_sizes))
    for name, row in rows.items():
        cells = [f"{row['lat'][s]['p50']:.1f} / {row['lat'][s]['p99']:.1f}" if s in row["lat"] else "" for s in lat_sizes]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def plot(rows: dict[str, dict[str, Any]], sizes: list[int], lat_sizes: list[int], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG (pip install matplotlib)", file=sys.stderr)
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 5))
    for name, row in rows.items():
        xs = [s for s in sizes if s in row["bw"]]
        a.plot(xs, [statistics.median(row["bw"][s]) for s in xs], marker="o", label=name)
        ls = [s for s in lat_sizes if s in row["lat"]]
        b.plot(ls, [row["lat"][s]["p50"] for s in ls], marker="o", label=name)
    a.set_xscale("log", base=2)
    a.set_xlabel("message size (bytes)")
    a.set_ylabel("GB/s (median of 3)")
    a.set_title("bandwidth, two processes")
    b.set_xscale("log", base=2)
    b.set_yscale("log")
    b.set_xlabel("message size (bytes)")
    b.set_ylabel("one-way latency p50 (µs)")
    b.set_title("latency, two processes")
    for ax in (a, b):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


async def main(args: argparse.Namespace) -> None:
    if args.netns:
        CHILD_PREFIX[:] = ["ip", "netns", "exec", args.netns]
        return await netns_main(args)
    sizes = BW_SIZES if not args.quick else [1 << 20, 64 << 20]
    lat_sizes = LAT_SIZES if not args.quick else [8]
    rows: dict[str, dict[str, Any]] = {}
    plan: list[tuple[str, Any]] = [
        ("ucx_perftest posix,cma", lambda: perftest_row("posix,cma", sizes, lat_sizes)),
        ("ucx_perftest tcp", lambda: perftest_row("tcp", sizes, lat_sizes)),
        ("raw ucxx polling, shm/cma", lambda: raw_row("posix,cma", sizes, lat_sizes, args.inflight)),
        ("sage ucx (blocking), shm/cma", lambda: sage_row("ucx", {}, sizes, lat_sizes, args.inflight)),
        ("sage ucx (polling), shm/cma", lambda: sage_row("ucx", {"progress_mode": "polling"}, sizes, lat_sizes, args.inflight)),
        ("sage ucx, UCX tcp", lambda: sage_row("ucx", {"tls": "tcp"}, sizes, lat_sizes, args.inflight)),
        ("sage tcp (asyncio+uvloop)", lambda: sage_row("tcp", {}, sizes, lat_sizes, args.inflight)),
    ]
    for name, run in plan:
        if args.only and not any(o in name for o in args.only):
            continue
        print(f"running: {name}", file=sys.stderr, flush=True)
        rows[name] = await run()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "inflight": args.inflight,
    }
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    table = markdown(rows, sizes, lat_sizes)
    args.out.with_suffix(".md").write_text(table)
    plot(rows, sizes, lat_sizes, args.out.with_suffix(".png"))
    print(table)


async def netns_main(args: argparse.Namespace) -> None:
    """Receiving side in namespace ``--netns`` listening on ``--host`` (the far end of a veth pair); this
    process must run in the other namespace (see bench/README.md)."""
    sizes = BW_SIZES if not args.quick else [1 << 20, 64 << 20]
    lat_sizes = LAT_SIZES if not args.quick else [8]
    plan: list[tuple[str, Any]] = [
        ("raw socket over veth (1 stream)", lambda: socket_row_in_child(args.host, sizes)),
        ("sage tcp over veth", lambda: sage_row("tcp", {"host": args.host}, sizes, lat_sizes, args.inflight)),
        (
            "sage ucx (UCX tcp) over veth",
            lambda: sage_row("ucx", {"host": args.host, "tls": "tcp", "locality": "remote"}, sizes, lat_sizes, args.inflight),
        ),
    ]
    rows: dict[str, dict[str, Any]] = {}
    for name, run_row in plan:
        if args.only and not any(o in name for o in args.only):
            continue
        print(f"running: {name}", file=sys.stderr, flush=True)
        rows[name] = await run_row()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"rows": rows}, indent=1))
    table = markdown(rows, sizes, lat_sizes)
    args.out.with_suffix(".md").write_text(table)
    print(table)


def run(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        if sys.argv[2] == "sage":
            run(serve_sage(sys.argv[3], json.loads(sys.argv[4])))
        elif sys.argv[2] == "socket":
            serve_socket(sys.argv[3])
        else:
            run(serve_raw(sys.argv[3]))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "link")
    parser.add_argument("--quick", action="store_true", help="two sizes, one latency size")
    parser.add_argument("--inflight", type=int, default=4, help="frames in flight for bandwidth (default 4)")
    parser.add_argument("--only", nargs="*", help="run only rows whose name contains one of these")
    parser.add_argument("--netns", default=None, help="run the receiving side in this network namespace")
    parser.add_argument("--host", default="127.0.0.1", help="with --netns: the receiver's address in it")
    run(main(parser.parse_args()))
