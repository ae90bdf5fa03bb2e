"""The training setups the benchmarks compare on the same examples: the original tutorial's Trainer, TRL's
padding-free SFTTrainer and this project's train stage (built by samsum_qlora.training.setup), and one
measurement of any of them."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
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
    TrainingArguments,
    set_seed,
)

from benchmarks.harness import report
from benchmarks.harness.lengths import IGNORE_INDEX
from benchmarks.harness.meter import ThroughputMeter
from offline.run import merge
from samsum_qlora.params import Params, parse_params

log = logging.getLogger(__name__)

SEQUENCES_PER_STEP = 16
SEED = 42
PROJECT_PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


class SetupSkipped(Exception):
    """A setup that cannot run here (a library is missing); the others still run."""


@dataclass
class Bench:
    """What a setup trains: the model folder, the examples, warm-up and timed steps, the project's overrides."""

    model_dir: Path
    examples: list[dict[str, list[int]]]
    steps: int
    warmup: int
    scratch: Path  # output_dir of the trainers (nothing is saved there)
    project_overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps


def compute_dtype() -> torch.dtype:
    """bf16 on CUDA; fp32 on CPU, where bf16 matmuls are slower (the project's device policy)."""
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def load_4bit(model_dir: Path) -> torch.nn.Module:
    """The model in NF4 with double quantization and the compute dtype, as the tutorial loads it."""
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
    """The tutorial's LoRA: r 8, alpha 16, dropout 0.05 on q_proj and v_proj."""
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
    """The settings a trainer runs with: batch, optimizer, checkpointing, collator, attention."""
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
