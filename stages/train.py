"""Stage train: QLoRA fine-tuning of the base model on the tokenized summaries, with transformers' Trainer.

    python -m stages.train      (or: dvc repro train)

Reads data/tokenized/; writes models/adapter/ (LoRA adapter + tokenizer, loadable with
`PeftModel.from_pretrained(base, "models/adapter")`), metrics/train.json, metrics/train_run.json and the curves
under metrics/curves/. Checkpoints go to models/checkpoints/; a later run with the same params and data resumes
from the newest one (samsum_qlora/training/checkpoints.py). samsum_qlora/training/setup.py builds the Trainer
within the memory plan for training.max_memory_gib (samsum_qlora/memory/); a run that still runs out of GPU memory
stops with one line saying what to lower, and resumes from its last checkpoint after that change.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from datasets import DatasetDict, load_from_disk

from samsum_qlora import distributed
from samsum_qlora.errors import PipelineError, run_stage
from samsum_qlora.files import atomic_dir, drop_code_pointers, finite_or_none, write_json
from samsum_qlora.model.loading import peak_memory_gib
from samsum_qlora.params import Params, load_params
from samsum_qlora.paths import ADAPTER, CHECKPOINTS, TOKENIZED, TRAIN_METRICS, TRAIN_RUN
from samsum_qlora.training.checkpoints import (
    checkpoint_step,
    checkpoint_to_resume,
    interrupted_advice,
    resumable_checkpoint,
    resume_advice,
    run_fingerprint,
    train_resuming,
)
from samsum_qlora.training.curves import curves_callback
from samsum_qlora.training.determinism import nondeterministic_op_error
from samsum_qlora.training.guards import check_finite_weights
from samsum_qlora.training.microbatch import out_of_memory_error
from samsum_qlora.training.setup import prepare_training
from samsum_qlora.training.trainer import final_eval_loss

log = logging.getLogger(__name__)


def load_tokenized() -> DatasetDict:
    """The tokenize_mask stage's splits (train, and validation if it has rows)."""
    try:
        data = load_from_disk(TOKENIZED)
    except FileNotFoundError:
        raise PipelineError(f"{TOKENIZED} not found: run `dvc repro tokenize_mask` first") from None
    except Exception as err:  # a truncated or damaged Arrow file: pyarrow, OS and datasets errors alike
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        raise PipelineError(f"{TOKENIZED} could not be read ({type(err).__name__}: {reason}): a file in it is "
                            "damaged; re-create it with `dvc repro tokenize_mask` (or `dvc repro`); nothing was "
                            "trained") from None
    if not isinstance(data, DatasetDict) or "train" not in data:
        raise PipelineError(f"{TOKENIZED} has no train split: re-run `dvc repro tokenize_mask`")
    return data


def launch_workers(params: Params) -> None:
    """Train as training.num_processes data-parallel processes: the checkpoint folder is prepared here, once, and the
    workers (this module again, under accelerate's launcher) train from it."""
    distributed.check_training_processes(params.training)
    if not Path(TOKENIZED).is_dir():
        raise PipelineError(f"{TOKENIZED} not found: run `dvc repro tokenize_mask` first")
    if distributed.main_machine():  # the others share its folder (docs/multi-gpu.md) and must not clear it
        resume_from = checkpoint_to_resume(run_fingerprint(params, TOKENIZED))
        if resume_from:
            log.info("resuming from %s", resume_from)
    try:
        distributed.launch("stages.train", [], params.training.num_processes, "training")
    except distributed.WorkerFailed as err:
        raise PipelineError(f"{err}; {resume_advice()}") from None


def main() -> None:
    params = load_params()
    if params.training.num_processes > 1 and not distributed.in_worker():
        launch_workers(params)
    else:
        train(params)


def train(params: Params) -> None:
    """The stage in this process: all of it, or this process's share when it is one of several workers."""
    distributed.quiet_replicas()
    data = load_tokenized()
    has_eval = "validation" in data and len(data["validation"]) > 0
    run = prepare_training(params, data["train"], data["validation"] if has_eval else None)
    trainer, model, plan = run.trainer, run.model, run.plan
    fingerprint = run_fingerprint(params, TOKENIZED)
    # A worker reads the folder its launching process prepared.
    resume_from = resumable_checkpoint(fingerprint) if distributed.in_worker() else checkpoint_to_resume(fingerprint)
    if resume_from and not distributed.in_worker():  # else said by the launching process
        log.info("resuming from %s", resume_from)
    callbacks = curves_callback(resume=bool(resume_from)) if distributed.is_main() else []
    for callback in callbacks:
        trainer.add_callback(callback)
    start = time.perf_counter()
    try:
        result, tokens = train_resuming(trainer, resume_from)  # tokens of all processes
        runtime = time.perf_counter() - start
        run.guard.raise_if_stopped(CHECKPOINTS)  # an inf/NaN loss: no adapter, metrics untouched
        eval_loss = final_eval_loss(trainer) if has_eval else None
    except torch.OutOfMemoryError as err:
        raise out_of_memory_error(err, trainer, params.training, plan=plan) from None
    except RuntimeError as err:
        if (error := nondeterministic_op_error(err)) is None:
            raise
        raise error from None
    for callback in callbacks:
        callback.live.end()
    # Every process's peak and passes, gathered on all of them.
    per_process = distributed.gather([(round(peak_memory_gib(), 3), trainer.passes, trainer.checkpointed_layers)])
    if not distributed.is_main():
        return

    check_finite_weights(model)
    with atomic_dir(ADAPTER) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        run.tokenizer.save_pretrained(tmp)
        (tmp / "README.md").unlink(missing_ok=True)  # peft's empty card template; the card stage writes the card
        drop_code_pointers(tmp, ADAPTER)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    micro_batches = sum(passes for _, passes, _ in per_process)
    # Under a plan that checkpoints per pass: the decoder layers a pass checkpointed, on average.
    checkpointed_mean = (sum(layers for *_, layers in per_process) / max(1, micro_batches)
                         if trainer.layers_to_checkpoint else None)
    t = params.training
    trainable, total = model.get_nb_trainable_parameters()  # counts 4-bit packed weights at their real size
    # Short names: `dvc exp show` opens with these columns, and a terminal is 160 characters wide (hence no process
    # count here: it is the training.num_processes column, and num_processes below).
    write_json(TRAIN_METRICS, {
        # A non-finite eval_loss (the validation split overflowed) is null: JSON has no NaN.
        "train_loss": finite_or_none(round(losses[-1], 4)) if losses else None,
        "eval_loss": finite_or_none(round(eval_loss, 4)) if eval_loss is not None else None,
        "tokens_per_s": round(tokens / runtime, 1),  # all processes together
        "peak_memory_gib": max(peak for peak, *_ in per_process),  # of the fullest GPU (or process on CPU)
        "runtime_s": round(runtime, 2),
    })
    write_json(TRAIN_RUN, {
        "train_loss_mean": round(result.training_loss, 4),
        "steps": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0, 3),
        "resumed_from_step": checkpoint_step(resume_from) if resume_from else 0,
        "train_tokens": int(tokens),
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": round(100 * trainable / total, 4),
        "adapter_mb": round((Path(ADAPTER) / "adapter_model.safetensors").stat().st_size / 1e6, 3),
        **run.policy.describe(),
        "num_processes": len(per_process),
        "peak_memory_gib_per_process": [peak for peak, *_ in per_process],
        "quantized": params.quantization.use_4bit,
        "optim": run.policy.optim,
        # The switches as params.yaml sets them; what the memory plan chose instead is under memory_plan.
        "max_tokens_per_micro_batch": t.max_tokens_per_micro_batch,
        "micro_batches": micro_batches,  # forward/backward passes, all processes
        "gradient_checkpointing": t.gradient_checkpointing,
        "checkpointed_layers_per_pass": round(checkpointed_mean, 2) if checkpointed_mean is not None else None,
        "padding_free": t.padding_free,
        "attention": model.get_base_model().config._attn_implementation,
        "dequantized": params.quantization.use_4bit and t.dequantize,
        "compiled": t.compile and run.policy.device == "cuda",
        "upcast_frozen": t.upcast_frozen,
        "memory_plan": plan.describe(),  # None without a budget
        "deterministic": t.deterministic,
        "schedule": run.schedule.schedule.describe(),  # steps, warmup, peak learning rate, and any warnings
    })
    if checkpointed_mean is not None:
        log.info("activation checkpointing per pass: %.1f of %d decoder layers on average over %d passes",
                 checkpointed_mean, len(plan.pass_limits) - 1, micro_batches)
    log.info("adapter saved to %s", ADAPTER)


if __name__ == "__main__":
    run_stage(main, on_interrupt=interrupted_advice)
