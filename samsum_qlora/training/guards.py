"""The non-finite guard: training stops when the logged loss or grad_norm stays inf/NaN, and no non-finite
checkpoint or adapter is written."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from samsum_qlora.errors import PipelineError
from samsum_qlora.training.checkpoints import last_checkpoint

WATCHED = ("loss", "grad_norm")
CAUSES = "likely causes: training.learning_rate too high, fp16 overflow, or bad rows in the data"


def _non_finite(logs: dict) -> list[str]:
    return [key for key in WATCHED if isinstance(logs.get(key), (int, float)) and not math.isfinite(logs[key])]


class NonFiniteGuard(TrainerCallback):
    """Stops training once the logged loss or grad_norm has been inf/NaN on `patience` logged steps in a row. The
    logged values are reduced over the processes, so every process stops at the same step."""

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.in_a_row = 0
        self.stopped_at: tuple[int, list[str]] | None = None  # (step, the keys that were not finite)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict | None = None, **kwargs) -> None:
        """Count the logged steps with a non-finite loss or grad_norm; stop at `patience` of them in a row."""
        bad = _non_finite(logs or {})
        if not any(key in (logs or {}) for key in WATCHED):
            return  # an evaluation's log: says nothing about the training loss
        self.in_a_row = self.in_a_row + 1 if bad else 0
        if bad:
            control.should_save = False  # on_log runs before the step's save: no checkpoint of non-finite weights
            control.should_evaluate = False
        if self.in_a_row >= self.patience:
            self.stopped_at = (state.global_step, bad)
            control.should_training_stop = True

    def raise_if_stopped(self, checkpoints: str | Path) -> None:
        """The one-line PipelineError for a run this guard stopped (nothing if it did not)."""
        if self.stopped_at is None:
            return
        step, keys = self.stopped_at
        what = f"{' and '.join(keys)} {'was' if len(keys) == 1 else 'were'}"
        last = last_checkpoint(checkpoints)
        kept = (f"the last finite checkpoint {Path(last).as_posix()} is kept" if last
                else "no checkpoint had been saved yet")
        raise PipelineError(
            f"training stopped at step {step}: the logged {what} not finite on {self.patience} "
            f"logged step(s) in a row (training.nonfinite_patience); {CAUSES}; no adapter was saved and {kept}; "
            f"lower training.learning_rate or fix the data, then run `dvc repro train` again")


def check_finite_weights(model: torch.nn.Module) -> None:
    """Refuse to save an adapter with inf/NaN weights: a PipelineError naming the first such weight."""
    for name, weight in model.named_parameters():
        if weight.requires_grad and not bool(torch.isfinite(weight.detach()).all()):
            raise PipelineError(f"the trained adapter weight {name} is not finite (inf/NaN); {CAUSES}; no adapter "
                                f"was saved: lower training.learning_rate and run `dvc repro train` again")
