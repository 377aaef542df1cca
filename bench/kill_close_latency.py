"""How long after SIGKILL a peer sees a process's socket close, by how much memory the process held.

    .venv/bin/python bench/kill_close_latency.py [--mib 512 2048]

A killed process's kernel frees its memory before it closes its files (``do_exit``: ``exit_mm`` before
``exit_files``), so a peer learns of the death by its socket only once that is done: the floor under any "typed
error at its peers" figure that relies on the connection. Anonymous memory, anonymous memory with
``MADV_HUGEPAGE`` (transparent huge pages, where the kernel allows them), and a memfd (what
``KVMemory.allocate(shared=True)`` and ``sage-transport serve`` use), every page touched; median of 3 each.
"""

from __future__ import annotations

import argparse
import signal
import socket
import statistics
import subprocess
import sys
import time

_HOLDER = """
import mmap, os, socket, sys, time
kind, size, port = sys.argv[1], int(sys.argv[2]) << 20, int(sys.argv[3])
if size and kind == "memfd":
    fd = os.memfd_create("kv"); os.ftruncate(fd, size); m = mmap.mmap(fd, size)
elif size:
    m = mmap.mmap(-1, size)
    if kind == "anon+hugepage":
        m.madvise(mmap.MADV_HUGEPAGE)
for i in range(0, size, 4096):
    m[i] = 1
s = socket.create_connection(("127.0.0.1", port)); s.sendall(b"r"); time.sleep(120)
"""


def close_seen_ms(kind: str, mib: int) -> float:
    with socket.create_server(("127.0.0.1", 0)) as server:
        holder = subprocess.Popen([sys.executable, "-c", _HOLDER, kind, str(mib), str(server.getsockname()[1])])
        conn, _ = server.accept()
        with conn:
            conn.recv(1)  # it holds its memory now
            start = time.monotonic()
            holder.send_signal(signal.SIGKILL)
            conn.recv(1)
            elapsed = time.monotonic() - start
        holder.wait()
    return elapsed * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, nargs="*", default=[0, 512, 2048])
    args = parser.parse_args()
    print("| memory the killed process held | close seen, ms after SIGKILL (median of 3, min–max) |")
    print("|---|---|")
    for kind in ("anon", "anon+hugepage", "memfd"):
        for mib in args.mib:
            if not mib and kind != "anon":
                continue
            runs = [close_seen_ms(kind, mib) for _ in range(3)]
            what = f"{kind} {mib} MiB" if mib else "nothing"
            print(f"| {what} | {statistics.median(runs):.1f} ({min(runs):.1f}–{max(runs):.1f}) |", flush=True)


if __name__ == "__main__":
    main()
