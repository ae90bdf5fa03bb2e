"""How sure the comparison is: a paired-bootstrap confidence interval for each ROUGE gain over the test examples.

The interval answers "how much could the mean gain move on another test set of this size, drawn the same way?" by
resampling the test examples (each example keeps both models' scores: the resampling is paired). It does not
cover run-to-run training noise: another seed trains another adapter, and this interval knows nothing of it.
"""

from __future__ import annotations

from collections import Counter

from samsum_qlora.errors import PipelineError
from samsum_qlora.evaluation.scoring import ROUGE_KEYS

CONFIDENCE = 0.95
RESAMPLES = 9999  # scipy's default
SEED = 0  # fixed, so that the same predictions always give the same interval


def paired_scores(baseline_rows: list[dict], adapter_rows: list[dict]) -> tuple[list[str], dict[str, tuple]]:
    """The ids both models were scored on, sorted, and for each ROUGE key the two models' scores in that order."""
    baseline_by_id = _by_id(baseline_rows, "baseline")
    adapter_by_id = _by_id(adapter_rows, "adapter")
    if baseline_by_id.keys() != adapter_by_id.keys():
        only_baseline = sorted(baseline_by_id.keys() - adapter_by_id.keys())
        only_adapter = sorted(adapter_by_id.keys() - baseline_by_id.keys())
        raise PipelineError(
            f"the baseline and adapter predictions are not on the same test examples (ids only in the baseline's: "
            f"{len(only_baseline)}{_first(only_baseline)}; only in the adapter's: {len(only_adapter)}"
            f"{_first(only_adapter)}): the gain cannot be paired by example; run `dvc repro` to evaluate both again"
        )
    ids = sorted(baseline_by_id)
    scores = {
        key: (
            [float(baseline_by_id[example_id]["scores"][key]) for example_id in ids],
            [float(adapter_by_id[example_id]["scores"][key]) for example_id in ids],
        )
        for key in ROUGE_KEYS
    }
    return ids, scores


def gain_intervals(
    baseline_rows: list[dict], adapter_rows: list[dict], resamples: int = RESAMPLES, seed: int = SEED
) -> dict[str, dict[str, float]]:
    """For each ROUGE key, the 95% paired-bootstrap percentile interval of the mean gain (adapter − baseline), as
    fractions: {"low", "high"}."""
    import numpy as np
    from scipy import stats  # imported here: only compare's main needs it, and it takes a second to import

    ids, scores = paired_scores(baseline_rows, adapter_rows)
    if len(ids) < 2:
        raise PipelineError(
            f"a confidence interval needs at least 2 test examples, and both models were scored on {len(ids)}; "
            "set eval.max_samples (or data.test_samples) to 2 or more"
        )
    # One resampling for every key (axis -1 is the examples): each resample draws the same examples for all four.
    baseline = np.array([scores[key][0] for key in ROUGE_KEYS])
    adapter = np.array([scores[key][1] for key in ROUGE_KEYS])
    result = stats.bootstrap(
        (baseline, adapter),
        lambda base, tuned, axis: np.mean(tuned - base, axis=axis),
        n_resamples=resamples,
        batch=250,  # resamples drawn at a time: memory stays at a few times 250 × examples × keys floats
        paired=True,
        axis=-1,
        confidence_level=CONFIDENCE,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    interval = result.confidence_interval
    return {key: {"low": float(interval.low[i]), "high": float(interval.high[i])} for i, key in enumerate(ROUGE_KEYS)}


def includes_zero(interval: dict[str, float]) -> bool:
    """Whether the interval holds 0 (its ends included): the gain is then not told apart from no change."""
    return interval["low"] <= 0 <= interval["high"]


def _by_id(rows: list[dict], model: str) -> dict[str, dict]:
    by_id = {str(row["id"]): row for row in rows}
    if len(by_id) < len(rows):
        repeated = sorted(example_id for example_id, n in Counter(str(row["id"]) for row in rows).items() if n > 1)
        raise PipelineError(
            f"the {model} predictions repeat {len(repeated)} example ids{_first(repeated)}: each test example "
            "must be scored once; run `dvc repro` to evaluate it again"
        )
    return by_id


def _first(ids: list[str], shown: int = 3) -> str:
    if not ids:
        return ""
    more = ", …" if len(ids) > shown else ""
    return f" ({', '.join(ids[:shown])}{more})"
