"""The export check: the merged folder, loaded as a user loads it, must regenerate what evaluate_adapter measured.

The first N rows of the adapter's predictions are generated again from the merged folder with plain transformers
(AutoModelForCausalLM and AutoTokenizer from the folder, on CUDA if there is one), with the evaluation's prompt
and decoding (evaluation/generation.py). The verdict is the ROUGE-L difference in points; exact matches are
reported beside it, since a rounding of the weights may change a word without changing what a summary says.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from samsum_qlora.errors import PipelineError
from samsum_qlora.evaluation.generation import dialogue_prompts, generate, stop_token_ids
from samsum_qlora.evaluation.scoring import score_corpus
from samsum_qlora.files import read_jsonl
from samsum_qlora.params import Params

log = logging.getLogger(__name__)

ROW_KEYS = ("id", "dialogue", "reference", "prediction")


def file_sha256(path: str | Path) -> str | None:
    """The SHA-256 of a file's bytes, or None when there is no such file."""
    path = Path(path)
    if not path.is_file():
        return None
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def evaluated_rows(path: str | Path, examples: int) -> list[dict]:
    """The first `examples` rows of the adapter's predictions file, each with its id, dialogue, reference and
    prediction."""
    if not Path(path).is_file():
        raise PipelineError(f"{path} does not exist, so the export cannot be checked against the evaluation: run "
                            "`dvc repro evaluate_adapter` first, or export with --no-check")
    rows = read_jsonl(path)[:examples]
    if not rows:
        raise PipelineError(f"{path} holds no predictions: run `dvc repro -f evaluate_adapter`, or use --no-check")
    for number, row in enumerate(rows, 1):
        if not all(isinstance(row.get(key), str) for key in ROW_KEYS):
            raise PipelineError(f"{path}:{number}: a prediction row needs text {', '.join(ROW_KEYS)}; "
                                "run `dvc repro -f evaluate_adapter` to write it again")
    return rows


def compare_predictions(exported: list[str], rows: list[dict], max_drift_points: float) -> dict:
    """Exact matches and ROUGE-L (in points, against the rows' references) of the export's predictions beside the
    evaluated ones; passed when the ROUGE-L difference is within `max_drift_points` either way."""
    references = [row["reference"] for row in rows]
    evaluated = [row["prediction"] for row in rows]
    rouge_export = 100 * score_corpus(exported, references)[1]["rougeL"]
    rouge_evaluated = 100 * score_corpus(evaluated, references)[1]["rougeL"]
    drift = rouge_export - rouge_evaluated
    return {
        "examples": len(rows),
        "exact_matches": sum(a == b for a, b in zip(exported, evaluated, strict=True)),
        "rougeL_export": round(rouge_export, 4),
        "rougeL_evaluated": round(rouge_evaluated, 4),
        "rougeL_difference": round(drift, 4),
        "max_rouge_drift": max_drift_points,
        "passed": abs(drift) <= max_drift_points,
        "differing_ids": [row["id"] for row, text in zip(rows, exported, strict=True) if text != row["prediction"]],
    }


@torch.inference_mode()
def regenerate(params: Params, folder: str | Path, dtype: torch.dtype, dialogues: list[str]) -> list[str]:
    """Greedy summaries of `dialogues` by the model in `folder`, loaded with plain transformers, on CUDA if
    available, else the CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    stops = stop_token_ids(tokenizer, model, params.prompt.date_string)
    prompts, _ = dialogue_prompts(params, tokenizer, dialogues)
    generations = generate(model, tokenizer, prompts, params.eval.max_new_tokens, params.eval.batch_size, stops)
    return [g.text for g in generations]


def check_export(params: Params, folder: str | Path, dtype: torch.dtype, rows: list[dict],
                 max_drift_points: float) -> dict:
    """Regenerate the evaluated `rows` from `folder` and compare them with their evaluated predictions: the record
    written beside the export (less what it was checked against, which the caller knows)."""
    log.info("checking the export on %d evaluated dialogues", len(rows))
    exported = regenerate(params, folder, dtype, [row["dialogue"] for row in rows])
    result = compare_predictions(exported, rows, max_drift_points)
    log.info("export check: %d of %d summaries identical to the evaluated ones; ROUGE-L %.2f vs %.2f evaluated "
             "(%+.2f points, limit ±%g): %s", result["exact_matches"], result["examples"], result["rougeL_export"],
             result["rougeL_evaluated"], result["rougeL_difference"], max_drift_points,
             "passed" if result["passed"] else "FAILED")
    return {**result, "dtype": str(dtype).removeprefix("torch."),
            "device": "cuda" if torch.cuda.is_available() else "cpu"}
