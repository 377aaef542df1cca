#!/usr/bin/env bash
# One prepared run for a task that draws a GPU machine (budget: under 5 minutes of its 15).
#   here:    bash bench/gpu_wheels.sh
#   device:  run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=420)   # leaves room for one rerun
# Runs every GPU test (GPU KV through the channel: every pair of kinds, two processes on one GPU with CUDA IPC,
# CUDA events, device codecs, the engine adapters' CUDA paths; NCCL collectives on dedicated streams, NVML topology,
# the CUDA codec path), the GPU KV bench (bench/gpu_kv_bench.py: IPC placement and UCX against an in-process shuffled
# copy, pinned staging against pinned D2H+H2D, one token), the wire codecs' speeds on the GPU and the CPU, the NCCL
# collectives bench against raw torch.distributed, and `probe --json` with the real GPU; results land in $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
nvidia-smi -L | tee "$OUT/gpus.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.device_count())" | tee -a "$OUT/gpus.txt"
status=0
timeout 150 python3 -m pytest -q -p no:cacheprovider -o addopts="" -m gpu tests/test_device.py tests/test_collectives.py tests/test_hw.py tests/test_codec.py tests/test_lmdeploy_runs.py 2>&1 | tee "$OUT/gpu_tests.log" || status=1
# the CPU suite's device tests again, on the GPU machine (emulated device path, real UCX between processes)
timeout 60 python3 -m pytest -q -p no:cacheprovider -o addopts="" -m "not gpu" tests/test_device.py 2>&1 | tail -3 | tee -a "$OUT/gpu_tests.log" || status=1
# GPU KV against the GPU's own copies (issue 22)
timeout 180 python3 bench/gpu_kv_bench.py --tokens 32768 --repeat 5 --one-token 300 --out "$OUT" 2>&1 | tail -20 | tee "$OUT/gpu_kv.log" || status=1
# the wire codecs on the GPU and on this machine's CPU cores (issue 8)
timeout 90 python3 bench/codec_speed.py --runs 7 --out "$OUT/codec_speed" 2>&1 | tee "$OUT/codec_speed.md" || status=1
GPUS=$(python3 -c "import torch; print(max(1, min(2, torch.cuda.device_count())))")
timeout 150 python3 -m sage_transport.cli bench collectives --backend nccl --ranks "$GPUS" --json "$OUT/nccl_bench.json" 2>&1 | tee "$OUT/nccl_bench.md" || status=1
timeout 30 python3 -m sage_transport.cli probe --json --nccl-xml "$OUT/nccl_topo.xml" > "$OUT/probe.json" 2> "$OUT/probe.err" || status=1
python3 -c "import json; d=json.load(open('$OUT/probe.json')); print(d['recommended_preset'], [p for p in d['probes'] if p['name']=='nvidia'])" || status=1
exit $status
