"""A stage's memory budget: where it comes from, the one plan_memory of the train and evaluate stages, and torch's
allocator held to it.

A stage given an explicit budget (training.max_memory_gib, eval.max_memory_gib) also caps torch's allocator at it,
so a wrong estimate ends in the out-of-memory line (which names the budget), never in more memory than the user
allowed. Without one, the budget is the GPU's memory; on CPU there is none and the settings run as set.
"""

from __future__ import annotations

import logging
import os
import statistics
from typing import TYPE_CHECKING, overload

import torch

from samsum_qlora.memory.estimates import CONTEXT_GIB, GIB, Shape
from samsum_qlora.memory.planning import EvalPlan, TrainPlan, plan_generation, plan_training
from samsum_qlora.model.loading import DevicePolicy, load_config
from samsum_qlora.params import Params, TrainingParams

if TYPE_CHECKING:  # the evaluation stages plan without datasets: importing it (and pandas) costs them start-up
    from datasets import Dataset

log = logging.getLogger(__name__)


@overload
def plan_memory(params: Params, policy: DevicePolicy, *, train_data: Dataset) -> TrainPlan: ...
@overload
def plan_memory(params: Params, policy: DevicePolicy, *, longest_prompt: int) -> EvalPlan: ...
def plan_memory(params: Params, policy: DevicePolicy, *, train_data: Dataset | None = None,
                longest_prompt: int | None = None) -> TrainPlan | EvalPlan:
    """The memory plan of a training run on `train_data` (within training.max_memory_gib) or of generating for
    prompts of up to `longest_prompt` tokens (within eval.max_memory_gib); the budget defaults to the GPU's memory,
    and without one (CPU) the plan is the settings as set. Says what it chose; for an explicit budget, holds torch's
    allocator to it. A generation plan depends on the budget and the longest prompt only, so every process of a
    several-process evaluation cuts the same batches."""
    training = train_data is not None
    configured = params.training.max_memory_gib if training else params.eval.max_memory_gib
    budget, source = budget_gib(configured, policy.device)
    if budget is None:
        return TrainPlan.as_set(params.training) if training else EvalPlan.as_set(params.eval)
    shape = Shape.from_config(load_config(params.model))
    common = {"use_4bit": params.quantization.use_4bit, "element": policy.compute_dtype.itemsize,
              "double_quant": params.quantization.bnb_4bit_use_double_quant}
    if training:
        plan = plan_training(shape, params.training, budget, lora_r=params.lora.r,
                             lora_targets=params.lora.target_modules,
                             **training_lengths(train_data, params.training), **common)
    else:
        plan = plan_generation(shape, params.eval, budget, longest_prompt=longest_prompt, **common)
    adopt(plan, source, configured, policy.device)
    return plan


def training_lengths(train_data: Dataset, training: TrainingParams) -> dict[str, float | int]:
    """What plan_training reads of the tokenized train split, per process: the mean and the largest step's tokens,
    the longest example's, and the fraction of tokens the loss is computed on."""
    import pyarrow.compute as pc  # the train split's Arrow columns, read without copying them into Python

    per_process = max(1, training.per_device_train_batch_size // training.num_processes)  # the batch is split
    lengths = sorted(train_data["length"])
    labels = pc.list_flatten(train_data.data.column("labels"))
    largest = per_process * lengths[-1] if not training.padding_free else sum(lengths[-per_process:])
    return {"mean_step_tokens": per_process * statistics.fmean(lengths), "largest_step_tokens": largest,
            "longest_example": lengths[-1],
            "loss_fraction": pc.sum(pc.not_equal(labels, -100)).as_py() / max(1, len(labels))}


def budget_gib(configured: float | None, device: str) -> tuple[float | None, str]:
    """The budget in GiB and where it comes from: the param, else the GPU's memory (None on CPU with no param:
    no plan). The whole card, not what is free when the stage starts: the same params give the same plan, and
    experiments sharing a GPU (`dvc queue start -j N`) set their budgets (docs/memory.md, queued experiments)."""
    if configured is not None:
        return float(configured), "set"
    if device != "cuda":
        return None, "no GPU"
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return total / GIB, "the GPU's memory"


def adopt(plan: TrainPlan | EvalPlan, source: str, configured: float | None, device: str) -> None:
    """Say what the plan changed, with the budget (and where it comes from) and the estimate; for a budget set in
    params, hold torch's allocator to it."""
    said = f"memory budget {plan.budget_gib:.1f} GiB ({source}), estimated peak {plan.estimate_gib:.1f} GiB"
    if plan.changed:
        log.info("%s with %s: the settings as given would not fit", said, ", ".join(plan.changed))
        if isinstance(plan, TrainPlan) and plan.pass_limits is not None:
            steps = plan.checkpointing_steps()
            (first_tokens, first_layers), (last_tokens, last_layers) = steps[0], steps[-1]
            log.info("checkpointing per pass: %d of %d decoder layers for passes of up to %s tokens, ..., "
                     "%d for the largest (%s tokens); train_run.json lists every step", first_layers,
                     len(plan.pass_limits) - 1, f"{first_tokens:,}", last_layers, f"{last_tokens:,}")
    else:
        log.info("%s: the settings fit as given", said)
    if configured is not None or plan.changed:
        fewer_fragments(device)
    if configured is not None:
        cap_allocator(plan.budget_gib, device)


def fewer_fragments(device: str) -> None:
    """Let torch's allocator grow its blocks in place (expandable segments) rather than keep blocks of every size
    it has met. Under a plan that fills the budget, passes of changing sizes otherwise leave gaps that torch holds
    but cannot use: on an H200, 1.2 GiB of an 11 GiB allowance for the 8B shape, beyond the HEADROOM the estimates
    keep. A user's own PYTORCH_CUDA_ALLOC_CONF naming expandable_segments is left as it is."""
    if device != "cuda" or "expandable_segments" in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""):
        return
    setting = getattr(torch._C, "_accelerator_setAllocatorSettings", None) or torch.cuda.memory._set_allocator_settings
    setting("expandable_segments:True")


def cap_allocator(budget: float, device: str) -> None:
    """Hold torch's allocator to an explicit budget (less the context), so that no estimate error can make a stage
    take more than the user allowed: past it, allocation fails with the out-of-memory line."""
    if device != "cuda":
        return
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GIB
    torch.cuda.set_per_process_memory_fraction(min(1.0, max(0.0, (budget - CONTEXT_GIB) / total)))
