"""Stage tokenize_mask: render each example with the model's chat template and mask everything but the summary.

    python -m stages.tokenize_mask      (or: dvc repro tokenize_mask)

Reads data/prepared/{train,validation}.jsonl; writes data/tokenized/ (a DatasetDict saved with
`save_to_disk`, columns input_ids, labels, length) and metrics/tokens.json. Large splits are tokenized by
several processes (one per CPU core, at most 8), each taking whole chunks of rows: the same output, in order.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import statistics

from datasets import Dataset, DatasetDict
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from stages.errors import PipelineError, run_stage
from stages.files import atomic_dir, read_jsonl, write_json
from stages.modeling import load_tokenizer
from stages.params import PromptParams, load_params
from stages.prompt import IGNORE_INDEX, Example, build_example

log = logging.getLogger(__name__)

PREPARED = "data/prepared/{split}.jsonl"
TOKENIZED = "data/tokenized"
METRICS = "metrics/tokens.json"
SPLITS = ("train", "validation")


ROWS_PER_CHUNK = 500
ROWS_PER_PROCESS = 2000  # below this, starting a process (~3 s of imports) costs more than it saves
MAX_PROCESSES = 8


def default_processes(rows: int) -> int:
    """Processes for `rows` rows: one per available core, at most 8, and one per 2,000 rows."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, MAX_PROCESSES, math.ceil(rows / ROWS_PER_PROCESS)))


_worker: tuple[PreTrainedTokenizerBase, PromptParams] | None = None


def _start_worker(tokenizer: PreTrainedTokenizerBase, prompt: PromptParams) -> None:
    global _worker
    _worker = (tokenizer, prompt)


def _examples(rows: list[dict], tokenizer: PreTrainedTokenizerBase | None = None,
              prompt: PromptParams | None = None) -> list[Example | None]:
    tokenizer, prompt = (tokenizer, prompt) if tokenizer is not None else _worker
    return [build_example(tokenizer, prompt.instruction, row["dialogue"], row["summary"], prompt.max_length,
                          prompt.date_string) for row in rows]


def tokenize_split(
    tokenizer: PreTrainedTokenizerBase, rows: list[dict], prompt: PromptParams, split: str = "",
    processes: int | None = None,
) -> tuple[dict[str, list], dict]:
    """Tokenized columns for one split, and its statistics (lengths, truncated, dropped, loss fraction).
    `processes`: how many processes tokenize (default: default_processes); the output does not depend on it."""
    processes = processes or default_processes(len(rows))
    chunks = [rows[i : i + ROWS_PER_CHUNK] for i in range(0, len(rows), ROWS_PER_CHUNK)]
    columns: dict[str, list] = {"input_ids": [], "labels": [], "length": []}
    truncated = dropped = 0
    with tqdm(total=len(rows), desc=f"tokenize {split}", unit="ex", mininterval=2) as bar:
        if processes > 1:  # spawned: the parent may hold threads (tokenizers', tqdm's) that a fork would copy
            pool = multiprocessing.get_context("spawn").Pool(processes, _start_worker, (tokenizer, prompt))
            done = pool.imap(_examples, chunks)
        else:
            pool, done = None, (_examples(chunk, tokenizer, prompt) for chunk in chunks)
        try:
            for examples in done:
                for example in examples:
                    if example is None:
                        dropped += 1
                        continue
                    truncated += example.truncated
                    columns["input_ids"].append(example.input_ids)
                    columns["labels"].append(example.labels)
                    columns["length"].append(len(example.input_ids))
                bar.update(len(examples))
        finally:
            if pool is not None:
                pool.terminate()
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
