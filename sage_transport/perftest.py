"""The reference every figure is compared with: ``ucx_perftest`` from the libucx wheel, run in the same
sitting over the same UCX transports and message size.

``ucx_perftest`` reports MB/s in MiB (2**20 bytes); :func:`measure_link` converts to GB/s (1e9 bytes).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from pathlib import Path

import msgspec

from .errors import UnsupportedError
from .ports import free_port

__all__ = ["LinkReference", "measure_link", "perftest_binary"]

_FINAL = re.compile(r"^Final:\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", re.MULTILINE)


class LinkReference(msgspec.Struct, frozen=True, kw_only=True):
    """One ``ucx_perftest`` run: ``gbps`` (tag_bw) or ``latency_us`` (tag_lat, one-way)."""

    test: str
    message_bytes: int
    iterations: int
    ucx_tls: str
    gbps: float
    latency_us: float
    command: str


def perftest_binary() -> tuple[Path, Path]:
    """``(ucx_perftest, its library directory)`` from the installed libucx wheel."""
    try:
        import libucx  # type: ignore[import-not-found]
    except ImportError as exc:
        raise UnsupportedError("ucx_perftest comes with the libucx wheel (pip install ucxx-cu12)") from exc
    root = Path(libucx.__file__).parent
    binary = root / "bin" / "ucx_perftest"
    if not binary.exists():
        raise UnsupportedError(f"no ucx_perftest in {root / 'bin'}")
    return binary, root / "lib"


async def measure_link(
    message_bytes: int, *, ucx_tls: str, test: str = "tag_bw", iterations: int | None = None, timeout_s: float = 60.0
) -> LinkReference:
    """Run ``ucx_perftest`` server and client on this host (two processes) and parse its final line."""
    binary, libdir = perftest_binary()
    if iterations is None:
        iterations = max(20, min(10000, (2 << 30) // max(message_bytes, 1)))
    env = {**os.environ, "UCX_TLS": ucx_tls, "UCX_WARN_UNUSED_ENV_VARS": "n"}
    env["LD_LIBRARY_PATH"] = f"{libdir}:{env['LD_LIBRARY_PATH']}" if env.get("LD_LIBRARY_PATH") else str(libdir)
    port = free_port()
    args = ["-t", test, "-s", str(message_bytes), "-n", str(iterations), "-w", str(max(2, iterations // 10))]
    server = await asyncio.create_subprocess_exec(
        str(binary), "-p", str(port), env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                client = await asyncio.create_subprocess_exec(
                    str(binary),
                    "127.0.0.1",
                    "-p",
                    str(port),
                    *args,
                    env=env,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.STDOUT,
                )
                out, _ = await client.communicate()
                text = out.decode(errors="replace")
                match = _FINAL.search(text)
                if match:
                    break
                if server.returncode is not None:
                    raise UnsupportedError(f"ucx_perftest server exited ({server.returncode}); client said: {text[-400:]}")
                await asyncio.sleep(0.2)  # the server was not listening yet
    finally:
        if server.returncode is None:
            server.kill()
        with contextlib.suppress(ProcessLookupError):
            await server.wait()
    latency = float(match[2])  # 50th percentile overhead, usec
    mib_per_s = float(match[6])  # overall bandwidth, MiB/s
    command = f"UCX_TLS={ucx_tls} ucx_perftest 127.0.0.1 -p PORT {' '.join(args)}"
    return LinkReference(
        test=test,
        message_bytes=message_bytes,
        iterations=iterations,
        ucx_tls=ucx_tls,
        gbps=mib_per_s * (1 << 20) / 1e9,
        latency_us=latency,
        command=command,
    )
