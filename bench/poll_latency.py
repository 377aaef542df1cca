"""How late a polled wait (``sage_transport.polling.poll_until``, what every CUDA event and NCCL op is awaited
with) notices a condition that turns true ``--delays`` microseconds after the wait began.

    python bench/poll_latency.py [--delays 50,200,500] [--waits 200]

Prints the median and p90 lateness per delay: the cost a wait adds on top of the GPU work it waits for.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sage_transport.polling import poll_until


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delays", default="50,200,500", help="microseconds, comma-separated")
    parser.add_argument("--waits", type=int, default=200)
    args = parser.parse_args()
    print("| ready after µs | noticed late µs: median | p90 |\n|---|---|---|")
    for delay_us in (float(d) for d in args.delays.split(",")):
        late = []
        for _ in range(args.waits):
            ready = time.perf_counter() + delay_us * 1e-6
            await poll_until(lambda: time.perf_counter() >= ready)  # noqa: B023 (each wait reads its own deadline)
            late.append((time.perf_counter() - ready) * 1e6)
        late.sort()
        print(f"| {delay_us:.0f} | {statistics.median(late):.0f} | {late[int(0.9 * len(late))]:.0f} |")


if __name__ == "__main__":
    asyncio.run(main())
