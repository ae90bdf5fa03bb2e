"""The fine-tuned adapter against the untuned base model: both models' metrics and predictions read and checked,
their scores compared, and the test examples that show the difference best and worst."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from samsum_qlora.errors import PipelineError
from samsum_qlora.evaluation.scoring import ROUGE_KEYS
from samsum_qlora.files import read_jsonl
from samsum_qlora.paths import EVAL_METRICS, PREDICTIONS

log = logging.getLogger(__name__)

MODELS = ("baseline", "adapter")
STAGE_OF = {"baseline": "evaluate_baseline", "adapter": "evaluate_adapter"}
COMPARED_KEYS = (*ROUGE_KEYS, "gen_len_mean")
PREDICTION_FIELDS = ("id", "dialogue", "reference", "prediction", "scores")


@dataclasses.dataclass(frozen=True)
class Example:
    """One test example as both models summarised it, with its rank by the adapter's ROUGE-L gain."""

    label: str  # "best", "median", "worst" (or "rank i of n" when more than three are picked)
    id: str
    dialogue: str
    reference: str
    baseline_prediction: str
    adapter_prediction: str
    baseline_rouge_l: float
    adapter_rouge_l: float

    @property
    def gain(self) -> float:
        return self.adapter_rouge_l - self.baseline_rouge_l


def _require(path: Path, model: str) -> None:
    if not path.is_file():
        raise PipelineError(
            f"{path} not found: it is written by the `{STAGE_OF[model]}` stage; run `dvc repro` first"
        )


def load_metrics(model: str) -> dict:
    """metrics/{model}.json, with every compared key a number and every ROUGE score a fraction."""
    path = Path(EVAL_METRICS.format(which=model))
    _require(path, model)
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise PipelineError(f"{path} is not valid JSON ({err.msg}); re-run `{STAGE_OF[model]}`") from None
    if not isinstance(metrics, dict):
        raise PipelineError(f"{path} should hold a JSON object; re-run `{STAGE_OF[model]}`")
    for key in (*COMPARED_KEYS, "examples"):
        value = metrics.get(key)
        if value is None:
            raise PipelineError(f"{path} has no `{key}`; re-run `{STAGE_OF[model]}` to rewrite it")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PipelineError(f"{path}: `{key}` is {value!r}, not a number; re-run `{STAGE_OF[model]}`")
        if key in ROUGE_KEYS and not 0 <= value <= 1:
            raise PipelineError(f"{path}: `{key}` is {value}, not a fraction in [0, 1]")
    return metrics


def load_predictions(model: str) -> list[dict]:
    """data/predictions/{model}.jsonl, each row with the fields the report shows."""
    path = Path(PREDICTIONS.format(which=model))
    _require(path, model)
    rows = read_jsonl(path)
    for number, row in enumerate(rows, 1):
        missing = [field for field in PREDICTION_FIELDS if field not in row]
        if "scores" in row:
            scores = row["scores"] if isinstance(row["scores"], dict) else {}
            missing += [f"scores.{key}" for key in ROUGE_KEYS if key not in scores]
        if missing:
            raise PipelineError(f"{path}:{number}: missing {', '.join(missing)}; re-run `{STAGE_OF[model]}`")
    return rows


def compare_metrics(baseline: dict, adapter: dict) -> dict:
    """Both models' ROUGE and mean generation length, and the adapter's change over the baseline."""
    if baseline["examples"] != adapter["examples"]:
        raise PipelineError(
            f"the baseline was scored on {baseline['examples']} test examples and the adapter on "
            f"{adapter['examples']}: their means are not comparable; run `dvc repro` to evaluate both again"
        )
    return {
        "baseline": {key: float(baseline[key]) for key in COMPARED_KEYS},
        "adapter": {key: float(adapter[key]) for key in COMPARED_KEYS},
        "delta": {key: float(adapter[key]) - float(baseline[key]) for key in COMPARED_KEYS},
        "examples": int(adapter["examples"]),
    }


def headline(comparison: dict) -> dict:
    """What experiments are compared by (metrics/compare.json): ROUGE-L of both models, the gain and its 95%
    interval (low, high), under names short enough for `dvc exp show`; the other scores are in compare.md."""
    interval = comparison["interval"]["rougeL"]
    return {"rougeL": {"base": comparison["baseline"]["rougeL"], "tuned": comparison["adapter"]["rougeL"],
                       "gain": comparison["delta"]["rougeL"], "low": interval["low"], "high": interval["high"]}}


def rouge_plot_rows(comparison: dict) -> list[dict]:
    """One row per (ROUGE key, model); `bar` labels it for dvc's bar templates, which cannot group by a field.
    Both rows of a key also hold that key's gain and the gain's 95% interval (gain_low, gain_high)."""
    return [
        {"metric": key, "model": model, "bar": f"{key} {model}", "score": comparison[model][key],
         "gain": comparison["delta"][key], "gain_low": comparison["interval"][key]["low"],
         "gain_high": comparison["interval"][key]["high"]}
        for key in ROUGE_KEYS
        for model in MODELS
    ]


def rounded(data: Any) -> Any:
    """`data` with every float rounded to 6 decimals, as the metrics files hold them."""
    if isinstance(data, float):
        return round(data, 6)
    if isinstance(data, dict):
        return {key: rounded(value) for key, value in data.items()}
    if isinstance(data, list):
        return [rounded(value) for value in data]
    return data


def pick_examples(baseline_rows: list[dict], adapter_rows: list[dict], k: int = 3) -> list[Example]:
    """The examples at the top, middle and bottom (k spread evenly) of the ranking by ROUGE-L gain."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    baseline_by_id = {str(row["id"]): row for row in baseline_rows}
    adapter_by_id = {str(row["id"]): row for row in adapter_rows}
    common = baseline_by_id.keys() & adapter_by_id.keys()
    if not common:
        raise PipelineError(
            f"the baseline ({len(baseline_by_id)} ids) and adapter ({len(adapter_by_id)} ids) predictions "
            "share no example id: they were made on different test examples; run `dvc repro`"
        )
    if len(common) < max(len(baseline_by_id), len(adapter_by_id)):
        log.warning(
            "baseline has %d example ids, adapter %d, %d in common: picking examples from the common ones",
            len(baseline_by_id),
            len(adapter_by_id),
            len(common),
        )
    examples = [
        Example(
            label="",
            id=example_id,
            dialogue=adapter_by_id[example_id]["dialogue"],
            reference=adapter_by_id[example_id]["reference"],
            baseline_prediction=baseline_by_id[example_id]["prediction"],
            adapter_prediction=adapter_by_id[example_id]["prediction"],
            baseline_rouge_l=float(baseline_by_id[example_id]["scores"]["rougeL"]),
            adapter_rouge_l=float(adapter_by_id[example_id]["scores"]["rougeL"]),
        )
        for example_id in common
    ]
    ranked = sorted(examples, key=lambda example: (-example.gain, example.id))  # ties: by id
    last = len(ranked) - 1
    positions = dict.fromkeys(i * last // (k - 1) if k > 1 else 0 for i in range(k))
    return [_with_label(ranked[position], position, last) for position in positions]


def _with_label(example: Example, position: int, last: int) -> Example:
    if position == 0:
        label = "best"
    elif position == last:
        label = "worst"
    elif position == last // 2:
        label = "median"
    else:
        label = f"rank {position + 1} of {last + 1}"
    return dataclasses.replace(example, label=label)
