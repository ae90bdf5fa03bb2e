"""What a training run trains with, built in one place for the train stage and the benchmarks alike: the device
policy, the memory plan, the tokenizer, the base with seeded LoRA adapters, and the Trainer."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase, TrainerCallback, set_seed

from samsum_qlora.memory.budget import plan_memory
from samsum_qlora.memory.planning import TrainPlan
from samsum_qlora.model.loading import DevicePolicy, choose_device, load_base_model, load_tokenizer
from samsum_qlora.model.lora import add_lora
from samsum_qlora.params import Params
from samsum_qlora.paths import CHECKPOINTS
from samsum_qlora.training.determinism import make_deterministic
from samsum_qlora.training.guards import NonFiniteGuard
from samsum_qlora.training.microbatch import TokenCappedTrainer
from samsum_qlora.training.schedule import ScheduleCallback
from samsum_qlora.training.trainer import build_trainer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Training:
    """A training run ready to start: trainer.train() trains `model` (the base with its LoRA adapters)."""

    trainer: TokenCappedTrainer
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    policy: DevicePolicy
    plan: TrainPlan  # the memory switches the run uses (training.* as set when there is no budget)
    guard: NonFiniteGuard  # stops the run on an inf/NaN loss or grad_norm; raise_if_stopped() after train()
    schedule: ScheduleCallback  # says the schedule when training starts; .schedule holds it after that


def prepare_training(params: Params, train: Dataset, validation: Dataset | None = None,
                     callbacks: list[TrainerCallback] | None = None, output_dir: str = CHECKPOINTS) -> Training:
    """The run `params` describe on the tokenized `train` split (and `validation`, if given): the device chosen and
    said, the memory plan made for training.max_memory_gib, the seed set, the tokenizer and base loaded, LoRA
    added, and the Trainer built to write its checkpoints to `output_dir`, guarded against non-finite losses and
    saying its schedule when it starts; deterministic kernels only under training.deterministic."""
    if params.training.deterministic:
        make_deterministic()
    policy = choose_device(params.quantization, params.training.optim)
    log.info("device: %s", policy.reason)
    plan = plan_memory(params, policy, train_data=train)
    set_seed(params.seed)
    tokenizer = load_tokenizer(params.model)
    model = add_lora(load_base_model(params.model, params.quantization, policy), params, policy, plan)
    guard = NonFiniteGuard(params.training.nonfinite_patience)
    schedule = ScheduleCallback(params.training, len(train), evaluates=validation is not None)
    trainer = build_trainer(params, policy, model, tokenizer, train, validation,
                            [guard, schedule, *(callbacks or [])], output_dir, plan)
    return Training(trainer, model, tokenizer, policy, plan, guard, schedule)
