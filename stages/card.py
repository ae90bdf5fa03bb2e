"""Stage card: the adapter's model card, in the Hugging Face format, written from the pipeline's own files.

    python -m stages.card      (or: dvc repro card)

Reads params.yaml, models/adapter/adapter_config.json and metrics/{train,train_run,data,tokens,baseline,adapter,
compare}.json; writes models/card/README.md: YAML front matter that the Hugging Face hub reads (base model,
library, dataset, task, tags, and the adapter's test ROUGE as a model-index), then what the adapter is, its data,
its training, its ROUGE against the untuned base model, how to load it and its limits. Every figure comes from a
file an earlier stage wrote, so the card describes whichever run made the adapter; it loads no model.

The card is kept out of models/adapter/, the train stage's output (DVC forbids an output inside another): to
publish the adapter, copy the card into its folder as README.md, over the placeholder card peft writes there.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from samsum_qlora.errors import PipelineError, run_stage
from samsum_qlora.evaluation.card import ADAPTER_CONFIG, SPLITS, render_card
from samsum_qlora.evaluation.comparison import compare_metrics, load_metrics
from samsum_qlora.files import atomic_file
from samsum_qlora.params import load_params
from samsum_qlora.paths import CARD, COMPARE_JSON, DATA_METRICS, EVAL_METRICS, TOKEN_METRICS, TRAIN_METRICS, TRAIN_RUN

log = logging.getLogger(__name__)

# Each file the card reads: its path, the stage that writes it, and the keys the card needs from it.
INPUTS = {
    "train": (TRAIN_METRICS, "train", ("train_loss", "eval_loss", "tokens_per_s", "peak_memory_gib", "runtime_s")),
    "run": (TRAIN_RUN, "train",
            ("steps", "epochs", "resumed_from_step", "train_tokens", "trainable_params", "total_params",
             "trainable_percent", "adapter_mb", "device", "compute_dtype", "num_processes", "optim",
             "schedule.warmup_steps", "schedule.warnings")),
    "data": (DATA_METRICS, "prepare",
             tuple(f"{split}.{key}" for split in SPLITS for key in ("rows_in", "rows_usable", "rows_out"))),
    "tokens": (TOKEN_METRICS, "tokenize_mask", ("train.examples", "train.truncated")),
    "compare": (COMPARE_JSON, "compare", ("rougeL.base", "rougeL.tuned", "rougeL.gain", "rougeL.low", "rougeL.high")),
    "lora": (ADAPTER_CONFIG, "train", ("r", "lora_alpha", "lora_dropout", "target_modules")),
}


def read_input(name: str) -> dict:
    """One of INPUTS as a JSON object with the keys the card needs; a missing or stale file names its stage."""
    path, stage, keys = INPUTS[name]
    if not Path(path).is_file():
        raise PipelineError(f"{path} not found: it is written by the `{stage}` stage; run `dvc repro` first")
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise PipelineError(f"{path} is not valid JSON ({err.msg}); run `dvc repro` to rewrite it") from None
    for dotted in keys:
        node = data
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                raise PipelineError(f"{path} has no `{dotted}`: it is from an older `{stage}` stage; run "
                                    "`dvc repro` to rewrite it")
            node = node[part]
    return data


def read_inputs() -> dict[str, Any]:
    """Every file the card reads, and the comparison of both models' ROUGE, checked against metrics/compare.json
    (a mismatch means the files are from different runs)."""
    inputs: dict[str, Any] = {name: read_input(name) for name in INPUTS}
    inputs["baseline"], inputs["adapter"] = load_metrics("baseline"), load_metrics("adapter")
    inputs["comparison"] = compare_metrics(inputs["baseline"], inputs["adapter"])
    headline = inputs["compare"]["rougeL"]
    if abs(headline["tuned"] - inputs["adapter"]["rougeL"]) > 1e-6:
        raise PipelineError(
            f"{COMPARE_JSON} (ROUGE-L {headline['tuned']}) and {EVAL_METRICS.format(which='adapter')} (ROUGE-L "
            f"{inputs['adapter']['rougeL']}) are from different runs; run `dvc repro` to bring them up to date"
        )
    return inputs


def main() -> None:
    params = load_params()
    inputs = read_inputs()
    with atomic_file(CARD) as f:
        f.write(render_card(params, inputs))
    log.info("wrote %s", CARD)


if __name__ == "__main__":
    run_stage(main)
