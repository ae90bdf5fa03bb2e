"""Every artifact path of the pipeline, relative to the project root, in one place (dvc.yaml names the same ones)."""

from __future__ import annotations

PARAMS = "params.yaml"

# prepare
PREPARED = "data/prepared"
PREPARED_SPLIT = "data/prepared/{split}.jsonl"
DATA_METRICS = "metrics/data.json"

# tokenize_mask
TOKENIZED = "data/tokenized"
TOKEN_METRICS = "metrics/tokens.json"

# train
ADAPTER = "models/adapter"
CHECKPOINTS = "models/checkpoints"
CURVES = "metrics/curves"
TRAIN_METRICS = "metrics/train.json"  # what runs are compared by
TRAIN_RUN = "metrics/train_run.json"  # the rest: steps, tokens, parameters, device, switches, the memory plan

# evaluate_baseline, evaluate_adapter ({which}: baseline or adapter)
TEST_SPLIT = "data/prepared/test.jsonl"
EVAL_METRICS = "metrics/{which}.json"
PREDICTIONS = "data/predictions/{which}.jsonl"

# compare
COMPARE_JSON = "metrics/compare.json"
COMPARE_PLOT = "metrics/compare_rouge.json"
COMPARE_REPORT = "metrics/compare.md"
REPORT_IMAGES = "metrics/plots"  # the report's images, linked from it by relative paths

# card
CARD = "models/card/README.md"

# stages.export (not a stage of dvc repro)
MERGED = "models/merged"
EXPORT_CHECK = "export_check.json"  # inside the exported folder: the check of its generations against the evaluation
REJECTED = "{out}.rejected"  # beside --out: a merged model that failed that check, kept for inspection
