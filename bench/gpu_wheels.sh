#!/usr/bin/env bash
# Here (with PyPI): fetch the wheels the lent GPU machine lacks into .whl/ (git-ignored through .git/info/exclude).
# Its image has Python 3.12 with torch (CUDA), pytest, hypothesis, pytest-timeout, rich, xxhash, uvloop,
# nvidia-ml-py and pyyaml; it cannot reach PyPI. See bench/gpu_check.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir .whl
# ucxx and the UCX it loads (libucx-cu12 carries UCX's CUDA transports): the GPU KV tests and bench/gpu_kv_bench.py
# run over UCX. Pinned as libucxx requires them (libucx-cu12 <1.22); librmm-cu12 because libucxx's loader loads
# libucx only when librmm imports too. Without the Python rmm and cuda-core (ucxx's own CUDA helpers, which we
# never call), so the carry stays under its 64 MiB (about 54 MB in all).
for pkg in msgspec crc32c structlog pytest-asyncio "ucxx-cu12==0.52.*" "libucxx-cu12==0.52.*" "libucx-cu12==1.21.*" "librmm-cu12==26.10.*" rapids-logger; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "$pkg"
done
ls -la .whl
