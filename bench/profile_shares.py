"""Top hot spots per process from a py-spy raw profile (``py-spy record --subprocesses -f raw``).

    .venv/bin/python bench/profile_shares.py PROFILE.txt [--top 12]

Each sample is attributed to its innermost sage_transport frame plus the native or library function it was
in (memcpy, XXH3, numpy, uvloop); shares are of the samples in the data path, i.e. set-up (filling the
synthetic cache, digests, imports) is left out, so the figures describe the transfer itself.
"""

from __future__ import annotations

import argparse
import collections
import re

SETUP = ("_fill", "expected_digest", "_verify", "_find_and_load", "digest (sage_transport/serve", "_bench_fill")


def label(frames: list[str]) -> str:
    inner = next((f for f in reversed(frames) if "sage_transport/" in f), None)
    leaf = frames[-1]
    own = re.sub(r" \(.*", "", inner) if inner else "(outside sage_transport)"
    where = re.sub(r" \(.*", "", leaf)
    if inner is not None and leaf == inner:
        return own
    return f"{own} → {where}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("profile")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    per: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for line in open(args.profile):
        stack, _, count = line.rstrip("\n").rpartition(" ")
        frames = stack.split(";")
        processes = [f for f in frames if f.startswith("process ")]  # a child's stack follows its parent's name
        name = "receiver (serve)" if " serve" in processes[-1] else "sender (migrate)"
        body = frames[len(processes) :]
        if any(s in f for f in body for s in SETUP):
            continue
        if not any("sage_transport/" in f or "thread.py" in f for f in body):
            continue
        per[name][label(body)] += int(count)
    for name, counts in sorted(per.items()):
        total = sum(counts.values())
        print(f"## {name}: {total} samples in the data path")
        for what, n in counts.most_common(args.top):
            print(f"{100 * n / total:5.1f}%  {what}")
        print()


if __name__ == "__main__":
    main()
