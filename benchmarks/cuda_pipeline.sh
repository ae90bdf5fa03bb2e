#!/usr/bin/env bash
# The pipeline's real CUDA path, stage by stage without DVC: a Llama-3.2-1B-shaped model with random weights
# (built from the hub model's config, no download) and the offline tokenizer, trained for a few dozen steps
# on the bundled samples with the default job's settings (NF4 + bf16 + paged 8-bit AdamW), then both
# evaluations and the comparison. Prints the metrics; ROUGE is meaningless on random weights, speed and
# memory are not.
#   usage: bash benchmarks/cuda_pipeline.sh [STEPS] [WORKDIR]     (run from anywhere; needs one CUDA GPU)
set -euo pipefail
steps=${1:-40}
work=$(realpath -m "${2:-$(mktemp -d)}")
repo=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
mkdir -p "$work/data"
ln -sfn "$repo/data/samples" "$work/data/samples"
python3 -m benchmarks.harness.shapes --out "$work/llama-1b-shaped"
python3 - "$repo/params.yaml" "$work" "$steps" <<'PY'
import sys, yaml
params = yaml.safe_load(open(sys.argv[1]))
work, steps = sys.argv[2], int(sys.argv[3])
params["model"].update(base_model=f"{work}/llama-1b-shaped", tokenizer_type=None)
params["data"]["source"] = "data/samples"
params["training"].update(max_steps=steps, logging_steps=5, eval_steps=steps // 2, save_steps=steps // 2)
params["eval"].update(max_new_tokens=48)
yaml.safe_dump(params, open(f"{work}/params.yaml", "w"), sort_keys=False)
PY
cd "$work"
for stage in prepare tokenize_mask train "evaluate baseline" "evaluate adapter" compare card; do
  echo "== $stage"
  python3 -m stages.$stage
done
for f in metrics/train.json metrics/baseline.json metrics/adapter.json; do echo "== $f"; cat "$f"; done
