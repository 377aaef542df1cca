#!/usr/bin/env bash
# One prepared run for a task that draws a GPU machine (budget: under 5 minutes of its 15).
#   here:    bash bench/gpu_wheels.sh
#   device:  run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=420)   # leaves room for one rerun
#   parts:   bash bench/gpu_check.sh [tests|kvtests] [kv] [codec] [nccl] [probe] [profile]   # default: all but profile
#            (kvtests: tests/test_device.py's GPU tests alone)
# tests: every GPU test (GPU KV through the channel: every pair of kinds, two processes on one GPU with CUDA IPC,
#   CUDA events, device codecs, the engine adapters' CUDA paths; NCCL collectives on dedicated streams, NVML
#   topology, the CUDA codec path); kv: the GPU KV bench (bench/gpu_kv_bench.py: IPC placement and UCX against an
#   in-process shuffled copy, pinned staging against pinned D2H+H2D, one token); codec: the wire codecs' speeds on
#   the GPU and the CPU; nccl: the NCCL collectives bench against raw torch.distributed; probe: `probe --json`
#   with the real GPU. Results land in $OUT, in at most 8 files (what the device tool brings back).
set -uo pipefail
export PYTHONUNBUFFERED=1 OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
PARTS="${*:-tests kv codec nccl probe}"  # profile: py-spy over the bench's IPC case (its wheel in .whl)
want() { [[ " $PARTS " == *" $1 "* ]]; }
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
ENV="$OUT/env.txt"
nvidia-smi -L | tee "$ENV"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available(), torch.cuda.device_count())" | tee -a "$ENV"
# which UCX transports this machine's UCX loads (cuda_copy and cuda_ipc decide what the channel declares)
python3 -c "import libucx, os; print(os.path.dirname(libucx.__file__))" 2>>"$ENV" | while read -r dir; do
  LD_LIBRARY_PATH="$dir/lib" timeout 20 "$dir/bin/ucx_info" -v 2>&1 | head -3
  LD_LIBRARY_PATH="$dir/lib" timeout 20 "$dir/bin/ucx_info" -d 2>&1 | grep -E "^# +(Transport|Device):" | paste - - | sort -u
done >> "$ENV"
status=0
export SAGE_TEST_DUMP_S=20  # a test still running then has its asyncio tasks printed with its failure
PYTEST=(python3 -m pytest -q -p no:cacheprovider -o addopts="" -W default --timeout 35 -ra --tb=short -p pytest_instafail -m gpu)
if want tests || want kvtests; then  # the device KV tests first, the others after the bench (their failures print as they happen)
  PYTHONPATH="$PYTHONPATH:$PWD/bench" timeout 170 "${PYTEST[@]}" tests/test_device.py 2>&1 | tee "$OUT/gpu_tests.log" || status=1
fi
if want kv; then  # GPU KV against the GPU's own copies (issue 22)
  timeout 200 python3 bench/gpu_kv_bench.py --tokens 32768 --repeat 5 --one-token 300 --case-timeout 45 --out "$OUT" \
    > "$OUT/gpu_kv.log" 2>&1 || status=1
  grep -v "transfer.sent" "$OUT/gpu_kv.log" | tail -40
  rm -f "$OUT/gpu_kv.md"  # its table is at the end of gpu_kv.log
fi
if want profile; then  # where the IPC case's time goes on the host side (collapsed stacks, sender and receiver)
  timeout 90 /tmp/site/bin/py-spy record -r 250 -f raw -s -o "$OUT/profile_ipc.txt" -- python3 bench/gpu_kv_bench.py \
    --tokens 32768 --repeat 5 --cases ipc --case-timeout 60 --out /tmp/profile_run 2>&1 | grep -v "transfer.sent" | tail -8
fi
if want tests; then
  PYTHONPATH="$PYTHONPATH:$PWD/bench" timeout 120 "${PYTEST[@]}" tests/test_collectives.py tests/test_hw.py tests/test_codec.py \
    tests/test_lmdeploy_runs.py 2>&1 | tee -a "$OUT/gpu_tests.log" || status=1
fi
if want codec; then  # the wire codecs on the GPU and on this machine's CPU cores (issue 8)
  timeout 90 python3 bench/codec_speed.py --runs 7 --out "$OUT/codec_speed" 2>&1 | tee "$OUT/codec_speed.md" || status=1
fi
if want nccl; then
  GPUS=$(python3 -c "import torch; print(max(1, min(2, torch.cuda.device_count())))")
  timeout 90 python3 -m sage_transport.cli bench collectives --backend nccl --ranks "$GPUS" --json "$OUT/nccl_bench.json" \
    2>&1 | tee "$OUT/nccl_bench.md" || status=1
fi
if want probe; then
  timeout 30 python3 -m sage_transport.cli probe --json > "$OUT/probe.json" 2>> "$ENV" || status=1
  python3 -c "import json; d=json.load(open('$OUT/probe.json')); print(d['recommended_preset'], [p for p in d['probes'] if p['name']=='nvidia'])" 2>&1 | tee -a "$ENV" || status=1
fi
exit $status
