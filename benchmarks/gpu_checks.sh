#!/usr/bin/env bash
# The checks that need a GPU, in one go (about 8 minutes on an H200): the training-loop benchmark
# (benchmarks/train_loop.py: every size through the real loop, next to Hugging Face), then the GPU-only tests.
#   bash benchmarks/gpu_checks.sh [OUT_DIR] [CASES]     # logs and JSON land in OUT_DIR (default benchmarks/results/gpu)
# Needs torch with CUDA, deepspeed, pydantic, hjson, einops, pyyaml, safetensors, transformers, webdataset, pytest;
# wheels under .whl/ (the device tool's way of bringing what the image lacks) are installed first.
set -uo pipefail
out=${1:-benchmarks/results/gpu}
cases=${2:-}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PYTHONPATH" || exit 1
fi
nvidia-smi -L | tee "$out/train-loop.log"
status=0
timeout "${BENCH_TIMEOUT:-450}" python3 benchmarks/train_loop.py ${cases:+--cases "$cases"} \
  --out "$out/train-loop.json" 2>&1 | grep -v "^\[\|^  warnings.warn\|UserWarning" | tee -a "$out/train-loop.log" || status=1
[ "${TEST_TIMEOUT:-100}" = 0 ] || timeout "${TEST_TIMEOUT:-100}" python3 -m pytest -m gpu tests/unit/test_gpu.py -q -p no:cacheprovider 2>&1 \
  | tee "$out/pytest-gpu.log" | tail -25 || status=1
exit $status
