"""Real, fed and loss tokens per training micro-batch, and the time of every optimizer step: a setup's throughput."""

from __future__ import annotations

import time
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from benchmarks.harness import report
from benchmarks.harness.lengths import IGNORE_INDEX


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
