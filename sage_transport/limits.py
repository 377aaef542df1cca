"""What a migrate run is compared with, measured in the same run: the machine's limit for the same job.

``ucx_perftest`` moves one cache-resident buffer back and forth: a link's ceiling, not a scatter's. A KV migration
writes thousands of pages to shuffled places, which no link test does, so the main job also measures
:func:`shuffled_copy_gbps`: the same pages scattered by the same permutation inside one process (numpy, which
releases the GIL, on two threads), the fastest anything could place them on this machine without moving them
between processes. :func:`nixl_migrate` runs the same job with NIXL the way vLLM's NixlConnector drives it, in two
processes of its own (NIXL ships its own libucx, which cannot share a process with ucxx's).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from .errors import SageTransportError

__all__ = ["REFERENCE_BYTES", "nixl_migrate", "shuffled_copy_gbps"]

#: the copy reference scatters this much at most (whole layers): enough to leave every cache, without a second cache
REFERENCE_BYTES = 1 << 30


def shuffled_copy_gbps(pages: np.ndarray, dst_of_src: np.ndarray, threads: int = 2, repeats: int = 3) -> tuple[float, int]:
    """GB/s of scattering ``pages`` (layers × planes × blocks × page bytes) so that block ``s`` lands at block
    ``dst_of_src[s]``, on ``threads`` threads, median of ``repeats``; and the bytes each repeat copied. Only as
    many whole layers as fit :data:`REFERENCE_BYTES` are copied (every layer is scattered alike)."""
    layer_bytes = pages[0].nbytes
    layers = max(1, min(len(pages), REFERENCE_BYTES // max(layer_bytes, 1)))
    src = pages[:layers]
    dst = np.empty_like(src)
    dst.fill(0)  # fault the destination in before timing, as a receiver's registered cache is
    perm = np.asarray(dst_of_src, dtype=np.intp)
    groups = [range(k, layers, threads) for k in range(threads)]

    def scatter(group: range) -> None:
        for layer in group:
            dst[layer][:, perm] = src[layer]

    times = []
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(scatter, groups))
            times.append(time.perf_counter() - start)
    return src.nbytes / statistics.median(times) / 1e9, int(src.nbytes)


_NIXL_SIDE = r"""
import json, os, sys, time, resource
import numpy as np
from sage_transport.pd.nixl_peer import NixlSide, POLL_S
spec = json.loads(sys.argv[1])
pages, page = spec["pages"], spec["page_bytes"]
pool = np.zeros(pages * page, dtype=np.uint8)
words = pool.view(np.uint64)
if spec["role"] == "source":
    for start in range(0, words.size, 1 << 21):  # 16 MiB at a time: no whole-pool index array in the peak RSS
        part = words[start : start + (1 << 21)]
        np.multiply(np.arange(start, start + part.size, dtype=np.uint64), np.uint64(0x9E3779B97F4A7C15), out=part)
side = NixlSide(spec["role"], pool.ctypes.data, pool.nbytes, page)
if spec["role"] == "source":
    side.serve()
    print("@@" + json.dumps({"metadata": side.metadata().hex(), "base": pool.ctypes.data, "nbytes": pool.nbytes}), flush=True)
    cpu = time.process_time()
    sys.stdin.readline()
    cpu = time.process_time() - cpu
    side.close()
    print("@@" + json.dumps({"notified": len(side.notified), "cpu": cpu}), flush=True)
    sys.exit(0)
source = json.loads(sys.stdin.readline()[2:])
peer = side.add_peer(bytes.fromhex(source["metadata"]), source["base"], source["nbytes"])
layers, planes, blocks = spec["layers"], spec["planes"], spec["blocks"]
perm = np.array(spec["dst_of_src"], dtype=np.int64)
rows = np.arange(layers * planes, dtype=np.int64)[:, None] * blocks
remote_ids = (rows + np.arange(blocks)[None, :]).ravel()
local_ids = (rows + perm[None, :]).ravel()
seconds, cpu = [], 0.0
for repeat in range(spec["repeats"]):
    pool.fill(0)
    c0, t0 = time.process_time(), time.perf_counter()
    handle = side.post_read(peer, remote_ids, local_ids, f"migrate-{repeat}")
    while (state := side.state(handle)) == "PROC":
        time.sleep(POLL_S)
    seconds.append(time.perf_counter() - t0)
    cpu += time.process_time() - c0
    if state != "DONE":
        raise SystemExit(f"NIXL READ ended {state}")
view = pool.reshape(layers * planes, blocks, page)
row_words = blocks * page // 8
ok = True
for row in range(layers * planes):  # the source's pattern, a row at a time (no pool-sized temporary)
    first = np.arange(row * row_words, (row + 1) * row_words, dtype=np.uint64)
    expected = np.multiply(first, np.uint64(0x9E3779B97F4A7C15)).view(np.uint8).reshape(blocks, page)
    ok = ok and bool(np.array_equal(view[row][perm], expected))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print("@@" + json.dumps({"seconds": seconds, "cpu": cpu, "verified": ok, "peak_rss": peak}), flush=True)
"""


async def nixl_migrate(
    layers: int, planes: int, blocks: int, page_bytes: int, dst_of_src: np.ndarray, repeats: int
) -> dict[str, Any]:
    """The same migration with NIXL 1.5 as vLLM's NixlConnector drives it (:mod:`.pd.nixl_peer`): the receiver
    prepares both descriptor lists once and posts one READ of every page, mapping source block ``s`` to its block
    ``dst_of_src[s]``, its state polled every millisecond; the source drains notifications. Returns seconds per
    repeat, CPU seconds of both processes, whether every page landed, and the reader's peak RSS. Raises
    :class:`SageTransportError` when NIXL is not installed (``pip install nixl-cu12 --no-deps``)."""
    from .pd.nixl_peer import nixl_api

    if nixl_api() is None:
        raise SageTransportError(
            "--compare nixl needs NIXL: pip install 'nixl-cu12==1.5.1' --no-deps (its CUDA dependencies are not needed here)"
        )
    spec = {"pages": layers * planes * blocks, "page_bytes": page_bytes, "layers": layers, "planes": planes, "blocks": blocks}
    start = [sys.executable, "-c", _NIXL_SIDE]
    ucx = sys.modules.get("sage_transport.transports.ucx")  # NIXL runs without the UCX settings ucxx made here
    env = ucx.environment_before_ucxx() if ucx is not None else None
    source = await asyncio.create_subprocess_exec(
        *start, json.dumps({**spec, "role": "source"}), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env
    )
    reader = await asyncio.create_subprocess_exec(
        *start,
        json.dumps({**spec, "role": "reader", "dst_of_src": np.asarray(dst_of_src).tolist(), "repeats": repeats}),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env=env,
    )
    assert source.stdout is not None and source.stdin is not None and reader.stdin is not None and reader.stdout is not None

    async def answer_of(stream: asyncio.StreamReader) -> bytes:  # NIXL logs to stdout too: our lines start with @@
        while line := await stream.readline():
            if line.startswith(b"@@"):
                return line
        return b""

    try:
        async with asyncio.timeout(600):
            hello = await answer_of(source.stdout)
            if not hello:
                raise SageTransportError("the NIXL source process died before it registered its pool")
            reader.stdin.write(hello)
            await reader.stdin.drain()
            answer = await answer_of(reader.stdout)
            source.stdin.write(b"done\n")
            await source.stdin.drain()
            bye = await answer_of(source.stdout)
    finally:
        for proc in (source, reader):
            if proc.returncode is None:
                try:
                    async with asyncio.timeout(30):
                        await proc.wait()
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
    if not answer:
        raise SageTransportError(f"the NIXL reader process failed (exit {reader.returncode})")
    result: dict[str, Any] = json.loads(answer[2:])
    result["cpu"] += json.loads(bye[2:])["cpu"] if bye else 0.0
    return result
