#!/usr/bin/env bash
# The checks that need a GPU, in one go (a few minutes on an H100/H200): the GPU-only tests, then DeepSpeed's
# overhead over plain PyTorch (jobs/bench_train.py) for TimeSformer-L -- the case -- and the other sizes.
#   bash benchmarks/gpu_checks.sh [OUT_DIR]          # logs and JSON land in OUT_DIR (default benchmarks/results/gpu)
# Needs torch with CUDA, deepspeed, pydantic, hjson, einops, pyyaml, safetensors, transformers, pytest.
set -uo pipefail
out=${1:-benchmarks/results/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
nvidia-smi -L | tee "$out/train-overhead.log"
status=0
# TimeSformer-L 96x224, micro batch 4, ZeRO-2, full checkpointing, bf16: the target (<= 10%)
timeout 180 python3 jobs/bench_train.py --steps 20 --out "$out/train-overhead-l.json" 2>&1 \
  | grep -v "^\[" | tee -a "$out/train-overhead.log" || status=1
timeout 150 python3 -m pytest -m gpu tests/unit/test_gpu.py -q -p no:cacheprovider 2>&1 \
  | tee "$out/pytest-gpu.log" | tail -25 || status=1
# the other sizes (smaller steps show a fixed per-step cost more) and ZeRO-1/3 on the long model
for args in "--recipe k400_base --micro-batch 8" "--recipe k400_hr --micro-batch 2" "--zero-stage 1" "--zero-stage 3"; do
  name=$(echo "$args" | tr -d ' -' | sed 's/recipe//;s/microbatch/mb/;s/zerostage/zero/')
  timeout 90 python3 jobs/bench_train.py --steps 10 $args --out "$out/train-overhead-$name.json" 2>&1 \
    | grep -v "^\[" | tee -a "$out/train-overhead.log" || status=1
done
exit $status
