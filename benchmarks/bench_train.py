"""Training throughput: the tutorial's setup vs TRL's padding-free SFTTrainer vs this project's train stage.

    python -m benchmarks.bench_train [--setups tutorial,trl,project] [--steps 20] [--warmup 5] [--tiny]
                                     [--shape 1B|3B|8B] [--out benchmarks/results] [--label L]
                                     [--set training.padding_free=true ...]

All setups run in one process on the same device, one after the other, on the same synthetic SAMSum-length
examples (benchmarks/lengths.py) and a random-weight Llama-3.2-1B-shaped model (benchmarks/llama_shaped.py;
`--shape 3B` / `8B`: Llama-3.2-3B's or Llama-3.1-8B's shape, results in train-<device>-<date>-<shape>.json;
`--label L` appends -L):
NF4 with double quantization, bf16 compute, LoRA r 8 / alpha 16 / dropout 0.05 on q_proj and v_proj,
16 sequences per optimizer step. Reported per setup: real (non-padding) tokens per second over the timed
optimizer steps (after the warm-up steps), peak memory, and the loss at the last step. `--tiny` runs a
2-layer model with hidden size 128 for a few steps, on CPU when there is no GPU.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from datasets import Dataset
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    DataCollatorForSeq2Seq,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from benchmarks import report
from benchmarks.lengths import IGNORE_INDEX, describe, examples_for
from benchmarks.llama_shaped import SHAPES, TINY, benchmark_model
from offline.run import merge
from samsum_qlora.params import Params, parse_params

log = logging.getLogger(__name__)

SETUPS = ("tutorial", "trl", "project")
SEQUENCES_PER_STEP = 16
SEED = 42
PROJECT_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


class SetupSkipped(Exception):
    """A setup that cannot run here (a library is missing); the others still run."""


@dataclass
class Bench:
    model_dir: Path
    examples: list[dict[str, list[int]]]
    steps: int
    warmup: int
    scratch: Path  # output_dir of the trainers (nothing is saved there)
    project_overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps


class ThroughputMeter(TrainerCallback):
    """Counts the tokens each training micro-batch holds and timestamps the end of every optimizer step.

    Batches are counted as they reach the trainer's compute_loss, so every setup is measured the same way
    whatever its collator does: real tokens are the ids that are not the pad id (the synthetic data never
    contains it), fed tokens all positions including padding, loss tokens the labels that are not -100.
    """

    def __init__(self, pad_token_id: int, warmup: int) -> None:
        self.pad_token_id = pad_token_id
        self.warmup = warmup
        self._pending: list[tuple[torch.Tensor, int, torch.Tensor | None]] = []
        self._totals = [0, 0, 0]  # real, fed, loss tokens so far
        self.marks: list[tuple[float, int, int, int]] = []  # (time, real, fed, loss tokens so far)

    def attach(self, trainer: Trainer) -> None:
        compute_loss = trainer.compute_loss

        def counting_compute_loss(model: torch.nn.Module, inputs: dict, *args: Any, **kwargs: Any) -> Any:
            if model.training:
                self._count(inputs)
            return compute_loss(model, inputs, *args, **kwargs)

        trainer.compute_loss = counting_compute_loss

    def _count(self, inputs: dict[str, Any]) -> None:
        input_ids, labels = inputs["input_ids"], inputs.get("labels")
        # Kept on the device: reading them now would add a synchronisation to every micro-batch.
        self._pending.append(
            (
                (input_ids != self.pad_token_id).sum(),
                input_ids.numel(),
                None if labels is None else (labels != IGNORE_INDEX).sum(),
            )
        )

    def _mark(self) -> None:
        report.synchronize()
        now = time.perf_counter()
        for real, fed, loss in self._pending:
            self._totals[0] += int(real)
            self._totals[1] += fed
            self._totals[2] += int(loss) if loss is not None else 0
        self._pending.clear()
        self.marks.append((now, *self._totals))

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._mark()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._mark()

    def summary(self) -> dict[str, Any]:
        """Throughput over the steps after the warm-up, measured from the end of the last warm-up step."""
        if len(self.marks) <= self.warmup + 1:
            raise RuntimeError(f"only {len(self.marks) - 1} steps ran; need more than the {self.warmup} warm-up steps")
        (t0, real0, fed0, loss0), (t1, real1, fed1, loss1) = self.marks[self.warmup], self.marks[-1]
        steps = len(self.marks) - 1 - self.warmup
        times = [mark[0] for mark in self.marks[self.warmup :]]
        step_seconds = [end - start for start, end in zip(times, times[1:], strict=False)]
        return {
            "tokens_per_second": round((real1 - real0) / (t1 - t0), 1),
            "warmup_seconds": round(t0 - self.marks[0][0], 3),  # includes compiling, where a setup compiles
            "timed_steps": steps,
            "timed_seconds": round(t1 - t0, 3),
            "seconds_per_step": round((t1 - t0) / steps, 4),
            "slowest_step_seconds": round(max(step_seconds), 4),
            "real_tokens": real1 - real0,
            "padding_fraction": round(1 - (real1 - real0) / (fed1 - fed0), 4),
            "loss_tokens": loss1 - loss0,
            "loss_token_fraction": round((loss1 - loss0) / max(1, real1 - real0), 4),
        }


def compute_dtype() -> torch.dtype:
    # As the project's device policy: bf16 on CUDA; fp32 on CPU, where bf16 matmuls are slower.
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def load_4bit(model_dir: Path) -> torch.nn.Module:
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype(),
    )
    return AutoModelForCausalLM.from_pretrained(
        str(model_dir),
        quantization_config=quant,
        dtype=compute_dtype(),
        device_map={"": 0} if torch.cuda.is_available() else "cpu",
        trust_remote_code=False,
    )


def lora_config() -> LoraConfig:
    return LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], bias="none", task_type="CAUSAL_LM"
    )


def tutorial_trainer(bench: Bench, meter: ThroughputMeter) -> Trainer:
    """(a) The original tutorial: pad to the longest, 4 x 4 accumulation, checkpointing, paged 8-bit AdamW."""
    cuda = torch.cuda.is_available()
    set_seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(str(bench.model_dir), trust_remote_code=False)
    tokenizer.padding_side = "right"
    model = prepare_model_for_kbit_training(
        load_4bit(bench.model_dir),
        use_gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    model = get_peft_model(model, lora_config())
    args = TrainingArguments(
        output_dir=str(bench.scratch / "tutorial"),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=4,
        optim="paged_adamw_8bit" if cuda else "adamw_torch",  # the paged optimizers need CUDA
        bf16=cuda,
        learning_rate=2e-4,
        warmup_steps=50,
        lr_scheduler_type="linear",
        max_steps=bench.total_steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=SEED,
        use_cpu=not cuda,
    )
    return Trainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(bench.examples),
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX),
        processing_class=tokenizer,
        callbacks=[meter],
    )


def trl_trainer(bench: Bench, meter: ThroughputMeter) -> Trainer:
    """(b) TRL's SFTTrainer, padding-free, its defaults otherwise; 16 sequences in one micro-batch."""
    try:
        from trl import SFTConfig, SFTTrainer
    except Exception as err:  # ImportError, or a trl that does not fit the installed transformers
        raise SetupSkipped(f"trl cannot be imported ({type(err).__name__}: {err})") from None
    cuda = torch.cuda.is_available()
    set_seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(str(bench.model_dir), trust_remote_code=False)
    args = SFTConfig(
        output_dir=str(bench.scratch / "trl"),
        padding_free=True,
        max_length=None,  # padding-free without packing does not truncate; the examples are <= 512 tokens anyway
        per_device_train_batch_size=SEQUENCES_PER_STEP,
        gradient_accumulation_steps=1,
        max_steps=bench.total_steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=SEED,
        bf16=cuda,
        use_cpu=not cuda,
    )
    # The examples carry their own labels (-100 outside the summary), which SFTTrainer uses as they are.
    trainer = SFTTrainer(
        model=load_4bit(bench.model_dir),
        args=args,
        train_dataset=Dataset.from_list(bench.examples),
        processing_class=tokenizer,
        peft_config=lora_config(),
        callbacks=[meter],
    )
    return trainer


def project_params(bench: Bench) -> Params:
    """params.yaml's values, pointed at the benchmark model, with max_steps, logging and saving set for timing."""
    raw = yaml.safe_load(PROJECT_PARAMS.read_text(encoding="utf-8")) or {}
    timing = {
        "model": {"base_model": str(bench.model_dir), "tokenizer_type": None},
        "training": {"max_steps": bench.total_steps, "logging_steps": 1, "save_strategy": "no"},
    }
    return parse_params(merge(merge(raw, timing), bench.project_overrides))


def project_trainer(bench: Bench, meter: ThroughputMeter) -> Trainer:
    """(c) This project's train stage: the Trainer as the stage builds it (samsum_qlora.training.setup)."""
    # Imported here: a dependency only the train stage has (dvclive) then fails this setup, not the others.
    from samsum_qlora.training.setup import prepare_training

    dataset = Dataset.from_dict(  # the columns stages.tokenize_mask writes
        {
            "input_ids": [ex["input_ids"] for ex in bench.examples],
            "labels": [ex["labels"] for ex in bench.examples],
            "length": [len(ex["input_ids"]) for ex in bench.examples],
        }
    )
    # training.max_memory_gib planned as the stage plans it; never the project's models/checkpoints.
    training = prepare_training(project_params(bench), dataset, None, [meter],
                                output_dir=str(bench.scratch / "project"))
    log.info("project: %s", training.policy.reason)
    training.trainer.memory_plan = training.plan.describe()
    return training.trainer


BUILDERS: dict[str, Callable[[Bench, ThroughputMeter], Trainer]] = {
    "tutorial": tutorial_trainer,
    "trl": trl_trainer,
    "project": project_trainer,
}


def describe_trainer(trainer: Trainer) -> dict[str, Any]:
    from samsum_qlora.model.lora import checkpointing_on

    args = trainer.args
    model = trainer.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    collator = trainer.data_collator
    return {
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "optim": str(getattr(args.optim, "value", args.optim)),
        "learning_rate": args.learning_rate,
        "bf16": args.bf16,
        "gradient_checkpointing": checkpointing_on(base),
        "collator": type(collator).__name__,
        "attn_implementation": getattr(base.config, "_attn_implementation", None),
        "memory_plan": getattr(trainer, "memory_plan", None),  # the project's, under training.max_memory_gib
    }


def measure(name: str, bench: Bench, pad_token_id: int) -> dict[str, Any]:
    """Build one setup's trainer, train it for warm-up + timed steps, and return its numbers."""
    report.reset_memory()
    left_over = report.allocated_gib()  # what earlier setups in this process still hold: not this setup's
    meter = ThroughputMeter(pad_token_id, bench.warmup)
    trainer = BUILDERS[name](bench, meter)
    meter.attach(trainer)
    try:
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        result = {
            "setup": name,
            **meter.summary(),
            "peak_memory_gib": round(report.peak_memory_gib() - left_over, 3),
            "left_over_gib": round(left_over, 3),
            "first_loss": round(losses[0], 4) if losses else None,
            "final_loss": round(losses[-1], 4) if losses else None,
            "sequences_per_step": trainer.args.per_device_train_batch_size * trainer.args.gradient_accumulation_steps,
            "settings": describe_trainer(trainer),
        }
    finally:
        del trainer
        report.reset_memory()
    return result


def run(
    setups: list[str],
    steps: int,
    warmup: int,
    tiny: bool = False,
    out_dir: str | Path = report.RESULTS,
    model_dir: str | Path | None = None,
    tokenizer_dir: str | Path | None = None,
    project_overrides: dict[str, Any] | None = None,
    shape_name: str = "1B",
    label: str | None = None,
) -> tuple[dict[str, Any], Path]:
    """Run the setups in order; return the report and the JSON file it was written to."""
    shape = TINY if tiny else SHAPES[shape_name]
    started = time.perf_counter()
    model_dir = benchmark_model(tiny, model_dir, tokenizer_dir, shape_name)
    log.info("model ready in %.1f s: %s", time.perf_counter() - started, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    examples = examples_for(tokenizer, (warmup + steps) * SEQUENCES_PER_STEP, seed=0)
    scratch = tempfile.TemporaryDirectory(prefix="bench-train-")
    bench = Bench(model_dir, examples, steps, warmup, Path(scratch.name), project_overrides or {})

    out = report.header(
        "train",
        {
            "setups": setups,
            "steps": steps,
            "warmup_steps": warmup,
            "sequences_per_step": SEQUENCES_PER_STEP,
            "tiny": tiny,
            "shape": "tiny" if tiny else shape_name,
            "model_shape": asdict(shape),
            "parameters": shape.parameters(),
            "quantization": "nf4, double quant, compute " + str(compute_dtype()).removeprefix("torch."),
            "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"]},
            "data": describe(examples),
            "project_overrides": bench.project_overrides,
        },
    )
    if torch.cuda.is_available():
        out["peak_memory"] += ", less what earlier setups still held when it began (left_over_gib)"
    results, skipped, failed = [], [], []
    for name in setups:
        log.info("setup %s: %d warm-up + %d timed steps", name, warmup, steps)
        try:
            results.append(measure(name, bench, tokenizer.pad_token_id))
        except SetupSkipped as err:
            print(f"skipping {name}: {err}", file=sys.stderr)
            skipped.append({"setup": name, "reason": str(err)})
        except Exception as err:  # one broken setup must not cost the numbers of the others
            traceback.print_exc()
            failed.append({"setup": name, "error": f"{type(err).__name__}: {err}"[:1000]})
    scratch.cleanup()
    reference = next((r["tokens_per_second"] for r in results if r["setup"] == "tutorial"), None)
    for r in results:
        r["ratio_to_tutorial"] = round(r["tokens_per_second"] / reference, 3) if reference else None
    out.update({"results": results, "skipped": skipped, "failed": failed})
    shape_label = None if shape_name == "1B" else shape_name.lower()
    path = report.write_results(out, out_dir, tiny, report.file_label(shape_label, label))
    return out, path


def print_report(out: dict[str, Any], path: Path) -> None:
    c = out["config"]
    print(f"\n{out['device']}, {c['shape']} shape: {c['steps']} timed optimizer steps after {c['warmup_steps']} "
          "warm-up steps, "
          f"{c['sequences_per_step']} sequences per step")
    columns = [
        ("setup", "setup"),
        ("real tokens/s", "tokens_per_second"),
        ("peak GiB", "peak_memory_gib"),
        ("ratio to (a)", "ratio_to_tutorial"),
        ("final loss", "final_loss"),
    ]
    print(report.table(columns, out["results"]))
    print(f"peak memory: {out['peak_memory']}")
    for s in out["skipped"]:
        print(f"skipped {s['setup']}: {s['reason']}")
    for f in out["failed"]:
        print(f"FAILED {f['setup']}: {f['error']}")
    print(f"written to {path}")


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """['training.padding_free=true'] -> {'training': {'padding_free': True}} (values read as YAML)."""
    nested: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set takes KEY=VALUE, got {pair!r}")
        *sections, leaf = key.split(".")
        node = nested
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = yaml.safe_load(value)
    return nested


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setups", default=",".join(SETUPS), help=f"comma-separated, from {', '.join(SETUPS)}")
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps (default 20; --tiny: 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; --tiny: 1)")
    parser.add_argument("--tiny", action="store_true", help="2 layers, hidden 128, vocabulary 2048: a smoke test")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1B",
                        help="the model's shape: Llama-3.2-1B (default), Llama-3.2-3B or Llama-3.1-8B")
    parser.add_argument("--out", type=Path, default=report.RESULTS, help="folder for the JSON results")
    parser.add_argument("--label", default=None, help="appended to the file name (after the shape), e.g. ckpt")
    parser.add_argument("--model-dir", type=Path, default=None, help="where the random model is built (reused)")
    parser.add_argument("--tokenizer", type=Path, default=None, help="default: offline/tiny-llama")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="params.yaml override for the project setup, e.g. training.padding_free=true")
    args = parser.parse_args(argv)
    setups = [s.strip() for s in args.setups.split(",") if s.strip()]
    unknown = [s for s in setups if s not in SETUPS]
    if unknown or not setups:
        parser.error(f"unknown setups {unknown}; choose from {', '.join(SETUPS)}")
    steps = args.steps if args.steps is not None else (2 if args.tiny else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 5)
    if steps < 1 or warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    out, path = run(
        setups, steps, warmup, args.tiny, args.out, args.model_dir, args.tokenizer, parse_overrides(args.set),
        args.shape, args.label,
    )
    print_report(out, path)
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    sys.exit(1 if main()["failed"] else 0)
