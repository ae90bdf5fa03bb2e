"""Stages evaluate_baseline and evaluate_adapter: greedy summaries of the test split, scored with ROUGE.

    python -m stages.evaluate baseline   (or: dvc repro evaluate_baseline)
    python -m stages.evaluate adapter    (or: dvc repro evaluate_adapter)

The baseline is the untuned base model asked zero-shot with the same prompt; the adapter run loads
models/adapter/ on top of the same base. Writes metrics/<which>.json and data/predictions/<which>.jsonl.
With training.num_processes = N > 1 the generation runs in N processes (one per GPU, samsum_qlora/distributed.py), each
taking whole batches of the one-process plan, so the predictions are the same bytes as one process writes.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from samsum_qlora import distributed
from samsum_qlora.errors import PipelineError, run_stage
from samsum_qlora.evaluation.generation import (
    Generation,
    generate_all,
    generate_batches,
    model_and_prompts,
    plan_batches,
    share_batches,
    summarize_generations,
)
from samsum_qlora.evaluation.scoring import ROUGE_KEYS
from samsum_qlora.files import read_jsonl, write_json, write_jsonl
from samsum_qlora.model.adapter import check_adapter
from samsum_qlora.params import Params, load_params
from samsum_qlora.paths import ADAPTER, EVAL_METRICS, PREDICTIONS, TEST_SPLIT

log = logging.getLogger(__name__)


def evaluate(which: str, parts: str | None = None) -> None:
    """The stage: generate for the test split (in this process, or in training.num_processes processes that each
    write their share to a folder of parts), then score and write the outputs here."""
    params = load_params()
    rows = read_jsonl(TEST_SPLIT)
    if params.eval.max_samples:
        rows = rows[: params.eval.max_samples]
    if not rows:
        raise PipelineError(f"{TEST_SPLIT} has no rows: re-run `dvc repro prepare`")
    if which == "adapter":
        check_adapter()
    processes = distributed.local_processes(params.training.num_processes)
    if distributed.in_worker():
        if parts is None:
            raise PipelineError("a worker of several evaluation processes needs --parts (it is started by the stage)")
        generate_share(which, params, rows, Path(parts))
        return
    started = time.perf_counter()
    if processes > 1:
        generations = generate_in_processes(which, processes, len(rows))
    else:
        generations = generate_all(params, [r["dialogue"] for r in rows], _adapter_of(which))
    seconds = time.perf_counter() - started
    per_example, metrics = summarize_generations(generations, [r["summary"] for r in rows], seconds)
    metrics["processes"] = processes

    write_jsonl(
        PREDICTIONS.format(which=which),
        (
            {
                "id": r["id"],
                "dialogue": r["dialogue"],
                "reference": r["summary"],
                "prediction": g.text,
                "scores": {k: round(s[k], 6) for k in ROUGE_KEYS},
                "new_tokens": g.new_tokens,
                "stopped": g.stopped,
                "prompt_shortened": g.prompt_shortened,
            }
            for r, g, s in zip(rows, generations, per_example, strict=True)
        ),
    )
    write_json(EVAL_METRICS.format(which=which), metrics)
    log.info("%s: %s", which, metrics)


def _adapter_of(which: str) -> str | None:
    return ADAPTER if which == "adapter" else None


def generate_share(which: str, params: Params, rows: list[dict], parts: Path) -> None:
    """One worker's share: its batches of the one-process plan, written to parts/<rank>.jsonl."""
    distributed.quiet_replicas()
    ready = model_and_prompts(params, [r["dialogue"] for r in rows], _adapter_of(which))
    mine = share_batches(plan_batches(ready.prompts, ready.plan.batch_size), ready.prompts,
                         params.eval.max_new_tokens, distributed.rank(), distributed.world_size())
    results = generate_batches(ready.model, ready.tokenizer, ready.prompts, mine, params.eval.max_new_tokens,
                               ready.stop_ids)
    write_jsonl(parts / f"{distributed.rank()}.jsonl",
                ({"index": i, "text": g.text, "new_tokens": g.new_tokens, "stopped": g.stopped,
                  "prompt_shortened": ready.shortened[i]} for i, g in sorted(results.items())))


def generate_in_processes(which: str, processes: int, count: int) -> list[Generation]:
    """Generate in `processes` processes (one per GPU), each a share of the batches; their parts merged in order."""
    distributed.check_devices(processes)
    folder = Path(PREDICTIONS.format(which=which)).parent
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=f".{which}-parts-") as parts:
        distributed.launch("stages.evaluate", [which, "--parts", parts], processes, f"evaluation ({which})",
                           this_machine=True)
        results: dict[int, Generation] = {}
        for part in sorted(Path(parts).glob("*.jsonl")):
            for record in read_jsonl(part):
                results[record["index"]] = Generation(record["text"], record["new_tokens"], record["stopped"],
                                                      record["prompt_shortened"])
    if sorted(results) != list(range(count)):  # every process ended well, so this is a bug, not bad input
        raise RuntimeError(f"the evaluation processes returned {len(results)} of {count} predictions")
    return [results[i] for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description="Evaluate the base model or the fine-tuned adapter with ROUGE.")
    parser.add_argument("which", choices=["baseline", "adapter"])
    parser.add_argument("--parts", help=argparse.SUPPRESS)  # set by the stage for its worker processes
    args = parser.parse_args()
    evaluate(args.which, args.parts)


if __name__ == "__main__":
    run_stage(main)
