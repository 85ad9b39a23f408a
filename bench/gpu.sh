#!/usr/bin/env bash
# pelib's kernels on one GPU (made for an H200): correctness of the compiled kernels against torch
# on the device, and timings against torch eager and the bandwidth/FLOP limits.
#   bench/gpu.sh OUT_DIR        (default: $OUT, else results/gpu)
# Cases: NF4 dequant, RMSNorm, SwiGLU, RoPE, cross-entropy, a LoRA MLP, and a QLoRA training step of a
# SmolLM2-shaped model (random weights) with pelib.patch on vs off (goal: >= 1.5x).
# It runs `python -m pelib bench kernels --gpu --out DIR` (pelib/bench/kernels.py).
# Writes OUT_DIR/results.json, results.md (with library versions), bench.log, env.txt (nvidia-smi). About a minute or two on an H200;
# the whole script is capped at 7.5 minutes. bitsandbytes is compared when importable: carry its
# wheel in .whl/ (see the device README) and it is installed to /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-results/gpu}}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || echo "no nvidia-smi"; } > "$OUT_DIR/env.txt" 2>&1
cat "$OUT_DIR/env.txt"
export PYTHONUNBUFFERED=1
# BENCH_FLAGS="" runs the tiny CPU sizes instead (that is how the tests run this script)
timeout 450 "$PY" -m pelib bench kernels ${BENCH_FLAGS---gpu} --out "$OUT_DIR" 2>&1 | tee "$OUT_DIR/bench.log"
exit "${PIPESTATUS[0]}"
