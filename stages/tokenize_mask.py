"""Stage tokenize_mask: render each example with the model's chat template and mask everything but the summary.

    python -m stages.tokenize_mask      (or: dvc repro tokenize_mask)

Reads data/prepared/{train,validation}.jsonl; writes data/tokenized/ (a DatasetDict saved with
`save_to_disk`, columns input_ids, labels, length) and metrics/tokens.json.
"""

from __future__ import annotations

import logging
import statistics

from datasets import Dataset, DatasetDict
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from stages.errors import PipelineError, run_stage
from stages.files import atomic_dir, read_jsonl, write_json
from stages.modeling import load_tokenizer
from stages.params import PromptParams, load_params
from stages.prompt import IGNORE_INDEX, build_examples

log = logging.getLogger(__name__)

PREPARED = "data/prepared/{split}.jsonl"
TOKENIZED = "data/tokenized"
METRICS = "metrics/tokens.json"
SPLITS = ("train", "validation")
CHUNK = 1024  # examples encoded together (the tokenizer uses every core on a batch)


def tokenize_split(
    tokenizer: PreTrainedTokenizerBase, rows: list[dict], prompt: PromptParams, split: str = ""
) -> tuple[dict[str, list], dict]:
    """Tokenized columns for one split, and its statistics (lengths, truncated, dropped, loss fraction)."""
    columns: dict[str, list] = {"input_ids": [], "labels": [], "length": []}
    truncated = dropped = 0
    with tqdm(total=len(rows), desc=f"tokenize {split}", unit="ex", mininterval=2) as progress:
        for start in range(0, len(rows), CHUNK):
            chunk = rows[start : start + CHUNK]
            pairs = [(row["dialogue"], row["summary"]) for row in chunk]
            for example in build_examples(tokenizer, prompt.instruction, pairs, prompt.max_length, prompt.date_string):
                if example is None:
                    dropped += 1
                    continue
                truncated += example.truncated
                columns["input_ids"].append(example.input_ids)
                columns["labels"].append(example.labels)
                columns["length"].append(len(example.input_ids))
            progress.update(len(chunk))
    return columns, _stats(columns, truncated, dropped)


def _stats(columns: dict[str, list], truncated: int, dropped: int) -> dict:
    lengths = sorted(columns["length"])
    if not lengths:
        return {"examples": 0, "truncated": truncated, "dropped_summary_too_long": dropped}
    loss_tokens = sum(sum(t != IGNORE_INDEX for t in labels) for labels in columns["labels"])
    return {
        "examples": len(lengths),
        "tokens": sum(lengths),
        "length_mean": round(statistics.fmean(lengths), 2),
        "length_p50": lengths[len(lengths) // 2],
        "length_p95": lengths[min(len(lengths) - 1, int(0.95 * len(lengths)))],
        "length_max": lengths[-1],
        "truncated": truncated,
        "dropped_summary_too_long": dropped,
        "loss_token_fraction": round(loss_tokens / sum(lengths), 4),
    }


def main() -> None:
    params = load_params()
    tokenizer = load_tokenizer(params.model)
    splits, metrics = {}, {}
    for split in SPLITS:
        rows = read_jsonl(PREPARED.format(split=split))
        columns, metrics[split] = tokenize_split(tokenizer, rows, params.prompt, split)
        if not columns["input_ids"]:
            raise PipelineError(
                f"{PREPARED.format(split=split)}: no example fits prompt.max_length={params.prompt.max_length} "
                "tokens even with the dialogue removed; raise prompt.max_length"
            )
        splits[split] = Dataset.from_dict(columns)
        log.info("%s: %s", split, metrics[split])
    with atomic_dir(TOKENIZED) as tmp:
        DatasetDict(splits).save_to_disk(str(tmp))
    write_json(METRICS, metrics)


if __name__ == "__main__":
    run_stage(main)
