"""Stage tokenize_mask: render each example with the model's chat template and mask everything but the summary.

    python -m stages.tokenize_mask      (or: dvc repro tokenize_mask)

Reads data/prepared/{train,validation}.jsonl; writes data/tokenized/ (a DatasetDict saved with
`save_to_disk`, columns input_ids, labels, length) and metrics/tokens.json.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import statistics
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from datasets import Dataset, DatasetDict
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from samsum_qlora import paths
from samsum_qlora.data.prompt import IGNORE_INDEX, build_examples
from samsum_qlora.errors import PipelineError, run_stage
from samsum_qlora.files import atomic_dir, read_jsonl, write_json
from samsum_qlora.model.loading import load_tokenizer
from samsum_qlora.params import PromptParams, load_params

log = logging.getLogger(__name__)

SPLITS = ("train", "validation")
CHUNK = 1024  # examples built together: the templates are rendered one by one, the texts encoded in one call
MAX_WORKERS = 16

# What a worker process builds examples with: set before the workers are forked, so they inherit it unpickled.
_worker_state: tuple[PreTrainedTokenizerBase, PromptParams] | None = None


def workers_for(chunks: int) -> int:
    """Processes to build the chunks in: one per core this process may use (at most MAX_WORKERS and one per
    chunk); 1 where processes cannot be forked (the templates are then rendered here)."""
    if chunks < 2 or not sys.platform.startswith("linux"):
        return 1
    cores = len(os.sched_getaffinity(0))
    return max(1, min(cores, chunks, MAX_WORKERS))


def _build_chunk(pairs: list[tuple[str, str]]) -> list:
    tokenizer, prompt = _worker_state
    return build_examples(tokenizer, prompt.instruction, pairs, prompt.max_length, prompt.date_string)


def _quiet_worker() -> None:
    # One process per core already: the tokenizer's own threads would only compete with the other workers.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _built_chunks(
    tokenizer: PreTrainedTokenizerBase, chunks: list[list[tuple[str, str]]], prompt: PromptParams, workers: int
) -> Iterator[list]:
    """build_examples of each chunk, in order: here, or in `workers` forked processes (the same examples: each
    chunk is built alone either way)."""
    global _worker_state
    _worker_state = (tokenizer, prompt)
    try:
        if workers == 1:
            yield from map(_build_chunk, chunks)
            return
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                 initializer=_quiet_worker) as pool:
            try:
                yield from pool.map(_build_chunk, chunks)
            except BrokenProcessPool:
                raise PipelineError(
                    "tokenize_mask: a worker process building the examples died (killed for memory?); nothing "
                    "was written: free some memory and re-run `dvc repro tokenize_mask`"
                ) from None
    finally:
        _worker_state = None


def tokenize_split(
    tokenizer: PreTrainedTokenizerBase, rows: list[dict], prompt: PromptParams, split: str = "",
    workers: int | None = None,
) -> tuple[dict[str, list], dict]:
    """Tokenized columns for one split, and its statistics (lengths, truncated, dropped, loss fraction).
    `workers`: processes to build the examples in (default: workers_for); the result does not depend on it."""
    columns: dict[str, list] = {"input_ids": [], "labels": [], "length": []}
    truncated = dropped = 0
    chunks = [[(row["dialogue"], row["summary"]) for row in rows[start : start + CHUNK]]
              for start in range(0, len(rows), CHUNK)]
    workers = workers_for(len(chunks)) if workers is None else workers
    with tqdm(total=len(rows), desc=f"tokenize {split}", unit="ex", mininterval=2) as progress:
        for chunk in _built_chunks(tokenizer, chunks, prompt, workers):
            for example in chunk:
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
        prepared = paths.PREPARED_SPLIT.format(split=split)
        columns, metrics[split] = tokenize_split(tokenizer, read_jsonl(prepared), params.prompt, split)
        if not columns["input_ids"]:
            raise PipelineError(
                f"{prepared}: no example fits prompt.max_length={params.prompt.max_length} "
                "tokens even with the dialogue removed; raise prompt.max_length"
            )
        splits[split] = Dataset.from_dict(columns)
        log.info("%s: %s", split, metrics[split])
    with atomic_dir(paths.TOKENIZED) as tmp:
        DatasetDict(splits).save_to_disk(str(tmp))
    write_json(paths.TOKEN_METRICS, metrics)


if __name__ == "__main__":
    run_stage(main)
