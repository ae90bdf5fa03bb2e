#!/usr/bin/env bash
# One project-setup measurement per combination of the training switches, all on the same model and data:
# which switch buys what. Each line of SWEEP is a set of params overrides (empty: params.yaml as it is).
#   usage: bash benchmarks/sweep_train.sh [STEPS] [WARMUP] [OUT]     (run from the repository root)
set -uo pipefail
steps=${1:-15}
warmup=${2:-5}
out=${3:-benchmarks/results/sweep}
model_dir=${BENCH_MODEL_DIR:-$(python3 -c 'import tempfile; print(tempfile.gettempdir())')/samsum-bench/llama-1b-shaped}
SWEEP=${SWEEP:-"
training.dequantize=false training.upcast_frozen=true training.compile=false training.gradient_checkpointing=true
training.dequantize=false training.upcast_frozen=false training.compile=false training.gradient_checkpointing=true
training.dequantize=true training.upcast_frozen=false training.compile=false training.gradient_checkpointing=true
training.dequantize=true training.upcast_frozen=false training.compile=false training.gradient_checkpointing=false
training.dequantize=true training.upcast_frozen=false training.compile=true training.gradient_checkpointing=false
training.dequantize=true training.upcast_frozen=false training.compile=true training.gradient_checkpointing=true
training.dequantize=false training.upcast_frozen=false training.compile=true training.gradient_checkpointing=false
"}
i=0
while read -r line; do
  [ -z "$line" ] && continue
  i=$((i + 1))
  sets=()
  for kv in $line; do sets+=(--set "$kv"); done
  echo "== $line"
  timeout "${SWEEP_TIMEOUT:-240}" python3 -m benchmarks.bench_train --setups project --steps "$steps" \
    --warmup "$warmup" --model-dir "$model_dir" --out "$out/$i" "${sets[@]}" 2>&1 | grep -E "^project|FAILED|Error" | tail -5
done <<< "$SWEEP"
