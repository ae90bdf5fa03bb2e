"""Peak memory and speed of the train stage's Trainer per setting of the memory switches, on typical and heavy steps.

    python -m benchmarks.bench_memory [--caps null,8192,4096,2560] [--checkpointing] [--tiny] [--out DIR]

A pass's activations grow with its tokens, so an epoch's peak is set by its heaviest steps, not its average one.
This runs the stage's own Trainer (samsum_qlora.training.trainer.build_trainer, the summary loss, packed attention,
compiled layers on CUDA) on the Llama-3.2-1B-shaped model over 10 typical steps of 16 SAMSum-length examples (drawn
from the 65th-95th length percentiles: ~4,700 tokens, the real epoch's mean) and 10 heavy ones (the longest 10 %:
~7,000 tokens, its longest steps), once per setting of training.max_tokens_per_micro_batch (and once with
gradient checkpointing), all in one process on one model so that compiling is paid once. The base is loaded
unquantized in bf16, which is what training.dequantize makes of the NF4 base (same size, same matmuls).
"""

from __future__ import annotations

import argparse
import logging
import random
import time
from dataclasses import replace
from pathlib import Path

import torch
import yaml
from datasets import Dataset
from torch.utils.data import SequentialSampler
from transformers import TrainerCallback, set_seed

from benchmarks.harness import report
from benchmarks.harness.lengths import examples_for
from benchmarks.harness.shapes import benchmark_model
from offline.run import merge
from samsum_qlora.memory.planning import TrainPlan
from samsum_qlora.model.loading import choose_device, load_base_model, load_tokenizer
from samsum_qlora.model.lora import add_lora, enable_checkpointing
from samsum_qlora.params import PARAMS_FILE, parse_params
from samsum_qlora.training.trainer import build_trainer

log = logging.getLogger("benchmarks.bench_memory")

ROOT = Path(__file__).resolve().parents[1]
PROJECT_PARAMS = ROOT / PARAMS_FILE  # the values measured (the tests point it at the schema's defaults)
STEPS_PER_KIND = 10
SEQUENCES = 16


def pick_steps(examples: list[dict], seed: int = 0) -> list[list[dict]]:
    """10 typical then 10 heavy steps of 16 examples (see the module docstring)."""
    by_length = sorted(examples, key=lambda e: len(e["input_ids"]))
    n = len(by_length)
    rng = random.Random(seed)
    typical, heavy = by_length[n * 65 // 100: n * 95 // 100], by_length[-n // 10:]
    return ([rng.sample(typical, SEQUENCES) for _ in range(STEPS_PER_KIND)]
            + [rng.sample(heavy, SEQUENCES) for _ in range(STEPS_PER_KIND)])


class StepMeter(TrainerCallback):
    """Per optimizer step: seconds, passes and peak allocated memory."""

    def __init__(self, trainer_ref: list):
        self.rows: list[dict] = []
        self.trainer_ref = trainer_ref

    def on_step_begin(self, args, state, control, **kwargs):
        report.synchronize()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.start, self.passes = time.perf_counter(), self.trainer_ref[0].passes

    def on_step_end(self, args, state, control, **kwargs):
        report.synchronize()
        self.rows.append({"seconds": time.perf_counter() - self.start,
                          "passes": self.trainer_ref[0].passes - self.passes,
                          "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0})


def summarize(name: str, rows: list[dict], tokens: list[int]) -> dict:
    """Peaks and real tokens/s of the typical and the heavy steps; each kind's first two steps are warm-up."""
    out = {"setting": name}
    for kind, part in (("typical", slice(2, STEPS_PER_KIND)), ("heavy", slice(STEPS_PER_KIND + 2, None))):
        chosen, counts = rows[part], tokens[part]
        out[f"peak_gib_{kind}"] = round(max(r["peak_gib"] for r in chosen), 3)
        out[f"tokens_per_s_{kind}"] = round(sum(counts) / sum(r["seconds"] for r in chosen), 1)
        out[f"passes_{kind}"] = round(sum(r["passes"] for r in chosen) / len(chosen), 2)
    out["peak_gib_epoch_bound"] = round(max(r["peak_gib"] for r in rows), 3)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--caps", default="null,8192,4096,2560",
                        help="values of training.max_tokens_per_micro_batch to measure, comma-separated")
    parser.add_argument("--checkpointing", action="store_true", help="also measure gradient checkpointing, no cap")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model: a CPU smoke test")
    parser.add_argument("--out", default=str(report.RESULTS))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    model_dir = benchmark_model(tiny=args.tiny)
    overrides = {"model": {"base_model": str(model_dir), "tokenizer_type": None},
                 "quantization": {"use_4bit": False},
                 "training": {"optim": "adamw_torch", "save_strategy": "no", "logging_steps": 1000,
                              "max_steps": 2 * STEPS_PER_KIND, "per_device_train_batch_size": SEQUENCES,
                              "gradient_accumulation_steps": 1}}
    params = parse_params(merge(yaml.safe_load(PROJECT_PARAMS.read_text()), overrides))
    policy = choose_device(params.quantization, params.training.optim)
    set_seed(0)
    tokenizer = load_tokenizer(params.model)
    steps = pick_steps(examples_for(tokenizer, 4000, seed=0))
    tokens = [sum(len(e["input_ids"]) for e in step) for step in steps]
    flat = [e for step in steps for e in step]
    dataset = Dataset.from_dict({"input_ids": [e["input_ids"] for e in flat], "labels": [e["labels"] for e in flat]})
    model = add_lora(load_base_model(params.model, params.quantization, policy), params, policy)

    settings = [(f"cap {c}", {"max_tokens_per_micro_batch": None if c == "null" else int(c)})
                for c in args.caps.split(",")]
    if args.checkpointing:
        settings.append(("checkpointing, no cap", {"max_tokens_per_micro_batch": None}))
    results = []
    for name, switches in settings:
        if name.startswith("checkpointing"):
            enable_checkpointing(model.get_base_model())
        plan = replace(TrainPlan.as_set(params.training), **switches)  # no budget: the switches as this setting says
        ref: list = []
        meter = StepMeter(ref)
        trainer = build_trainer(params, policy, model, tokenizer, dataset, None, [meter],
                                output_dir=str(Path(args.out) / ".bench_memory_trainer"), plan=plan)
        ref.append(trainer)
        trainer._get_train_sampler = lambda *a, **k: SequentialSampler(dataset)  # the steps in the order built
        trainer.train()
        results.append(summarize(name, meter.rows, tokens))
        log.info("%s", results[-1])

    out = report.header("memory", {"steps_per_kind": STEPS_PER_KIND, "sequences_per_step": SEQUENCES,
                                   "step_tokens": tokens, "tiny": args.tiny, "compiled": policy.device == "cuda"
                                   and params.training.compile, "base": "bf16 (unquantized, as dequantized NF4)"})
    out["results"] = results
    path = report.write_results(out, args.out, tiny=args.tiny)
    print(report.table([("setting", "setting"), ("peak GiB typical", "peak_gib_typical"),
                        ("peak GiB heavy", "peak_gib_heavy"), ("tokens/s typical", "tokens_per_s_typical"),
                        ("tokens/s heavy", "tokens_per_s_heavy"), ("passes typical", "passes_typical"),
                        ("passes heavy", "passes_heavy")], results))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
