"""The run's schedule as the Trainer will follow it: steps per epoch, total optimizer steps, warmup and peak
learning rate, said in one line when training starts, with one warning when it cannot train well."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from samsum_qlora import distributed
from samsum_qlora.params import TrainingParams

log = logging.getLogger(__name__)

# A rule of thumb, warned about and never enforced: in fewer optimizer steps a LoRA adapter moves little from its
# start (docs/data.md#small-datasets measures it on the offline profile).
MIN_STEPS = 100


def warmup_setting(t: TrainingParams) -> int | float:
    """transformers' warmup_steps: the steps when training.warmup_steps is set, else the ratio (a float < 1 is read
    as a fraction of the run's optimizer steps, rounded up)."""
    return t.warmup_steps if t.warmup_steps is not None else t.warmup_ratio


@dataclass(frozen=True)
class Schedule:
    examples: int  # training examples (all processes)
    sequences_per_step: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    peak_learning_rate: float
    warnings: tuple[str, ...] = ()

    def line(self) -> str:
        epochs = self.total_steps / self.steps_per_epoch
        return (f"schedule: {self.examples} examples, {self.sequences_per_step} per optimizer step: "
                f"{self.steps_per_epoch} steps per epoch, {self.total_steps} steps ({epochs:.3g} epochs), "
                f"warmup {self.warmup_steps} steps, peak learning rate {self.peak_learning_rate:g}")

    def describe(self) -> dict:
        return {**asdict(self), "warnings": list(self.warnings)}


def schedule_warnings(t: TrainingParams, steps_per_epoch: int, total_steps: int, warmup_steps: int,
                      evaluates: bool) -> list[str]:
    """What makes this schedule unlikely to train well, each with the param to change; empty when it is sound."""
    found = []
    if warmup_steps * 2 >= total_steps:
        found.append(f"warmup takes {warmup_steps} of the run's {total_steps} steps, so the learning rate is at its "
                     f"peak for {'none' if warmup_steps >= total_steps else 'less than half'} of it: lower "
                     "training.warmup_steps (or leave it null and use training.warmup_ratio)")
    if total_steps < MIN_STEPS:
        found.append(f"only {total_steps} optimizer steps (fewer than {MIN_STEPS}): raise "
                     "training.num_train_epochs, or lower training.per_device_train_batch_size")
    intervals = [("logging_steps", t.logging_steps)] + ([("eval_steps", t.eval_steps)] if evaluates else [])
    short = [f"training.{name}={steps}" for name, steps in intervals if steps_per_epoch < steps]
    if short:
        found.append(f"an epoch is {steps_per_epoch} steps, shorter than {' and '.join(short)}: the curves get "
                     "fewer than one point per epoch; lower them")
    return found


def plan_schedule(t: TrainingParams, args: TrainingArguments, state: TrainerState, batches_per_epoch: int,
                  examples: int, evaluates: bool) -> Schedule:
    """The schedule of a Trainer about to train: its own step count (state.max_steps) and warmup."""
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / t.gradient_accumulation_steps))
    warmup = args.get_warmup_steps(state.max_steps)
    return Schedule(
        examples=examples,
        sequences_per_step=t.per_device_train_batch_size * t.gradient_accumulation_steps,
        steps_per_epoch=steps_per_epoch,
        total_steps=state.max_steps,
        warmup_steps=warmup,
        peak_learning_rate=args.learning_rate,
        warnings=tuple(schedule_warnings(t, steps_per_epoch, state.max_steps, warmup, evaluates)),
    )


class ScheduleCallback(TrainerCallback):
    """Says the schedule when training starts (and warns once when it is degenerate); keeps it in `.schedule`."""

    def __init__(self, training: TrainingParams, examples: int, evaluates: bool) -> None:
        self.training, self.examples, self.evaluates = training, examples, evaluates
        self.schedule: Schedule | None = None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       train_dataloader=None, **kwargs) -> None:
        batches = len(train_dataloader) if train_dataloader is not None else state.max_steps
        self.schedule = plan_schedule(self.training, args, state, batches, self.examples, self.evaluates)
        if distributed.is_main():
            log.info("%s", self.schedule.line())
            if self.schedule.warnings:
                log.warning("the schedule is unlikely to train well: %s", "; ".join(self.schedule.warnings))
