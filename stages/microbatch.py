"""The memory budget of a training step: micro-batches run as passes of at most training.max_tokens_per_micro_batch
tokens, and the one-line message that says what to lower when CUDA runs out of memory anyway.

A pass's activation memory grows with its tokens, and SAMSum steps of 16 sequences range from ~2,000 to ~7,000
tokens: a cap bounds the peak by the pass instead of by the longest step. The Trainer still draws the same
sequences per optimizer step; a micro-batch over the cap is cut at example boundaries (stages.batching.split_batch)
and each piece runs forward and backward on its own, its summed loss divided by the loss tokens of the whole step
(the Trainer's num_items_in_batch, see stages.objective.summary_loss). The step's loss and gradients are therefore
those of one pass, up to float rounding; only the random draws of dropout differ, as they fall on other shapes.
Each pass has a fixed cost on top of its tokens, so every extra pass costs time: the cap trades speed for memory
(README, Performance: a 1B step cut into two passes ran at about half the tokens/s on an H200).
"""

from __future__ import annotations

import re

import torch
from transformers import ProgressCallback, Trainer

from stages.batching import split_batch
from stages.checkpoints import CHECKPOINTS, last_checkpoint
from stages.errors import PipelineError
from stages.modeling import peak_memory_gib
from stages.objective import loss_token_count
from stages.params import TrainingParams


class TokenCappedTrainer(Trainer):
    """transformers' Trainer, running any micro-batch of more than `max_tokens` tokens as several passes."""

    def __init__(self, *args, max_tokens: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_tokens = max_tokens
        self.passes = 0  # forward/backward passes run by this Trainer
        self.running_pass: int | None = None  # tokens of the pass under way; None between passes

    def training_step(self, model: torch.nn.Module, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
        pieces = split_batch(inputs, self.max_tokens) if self.max_tokens else [inputs]
        if num_items_in_batch is None and len(pieces) > 1:  # the pieces share the whole micro-batch's divisor
            num_items_in_batch = loss_token_count(inputs["labels"])
        # The loss function divides by num_items_in_batch (compute_loss_func is set), so the Trainer scales nothing
        # and the pieces' losses add up to the micro-batch's.
        losses = []
        for piece in pieces:
            self.running_pass = piece["input_ids"].numel()
            losses.append(super().training_step(model, piece, num_items_in_batch))
            self.passes += 1
        self.running_pass = None
        return losses[0] if len(losses) == 1 else torch.stack(losses).sum()

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        except torch.OutOfMemoryError:
            # End the progress bars' line, so that the error line which follows starts a line of its own.
            for callback in self.callback_handler.callbacks:
                if isinstance(callback, ProgressCallback):
                    for bar in (callback.prediction_bar, callback.training_bar):
                        if bar is not None:
                            bar.close()
            raise


def _memory() -> str:
    peak = f"peak {peak_memory_gib():.1f} GiB"
    if not torch.cuda.is_available():
        return peak
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30
    return f"{peak} of {total:.1f} GiB"


def out_of_memory_error(err: BaseException, trainer: TokenCappedTrainer, training: TrainingParams,
                        checkpoints: str = CHECKPOINTS) -> PipelineError:
    """One actionable line for running out of memory in `trainer`: where, this run's numbers, the switches that
    lower memory without changing the run, and what `dvc repro` does next."""
    step, tokens, cap = trainer.state.global_step, trainer.running_pass, training.max_tokens_per_micro_batch
    memory = _memory()
    wanted = re.search(r"Tried to allocate ([\d.]+ [KMGT]iB)", str(err))
    if wanted:
        memory += f", {wanted.group(1)} more wanted"
    if tokens is None and not trainer.model.training:
        where = f"computing the validation loss after step {step:,}"
        fixes = [f"lower training.per_device_eval_batch_size (now {training.per_device_eval_batch_size})"]
    else:
        where = f"at step {step + 1:,}" + (f" in a pass of {tokens:,} tokens" if tokens else "")
        below = f" below {tokens:,}" if tokens else ""
        fixes = [f"lower training.max_tokens_per_micro_batch{below} (now {cap})" if cap else
                 f"set training.max_tokens_per_micro_batch{below} (now null: one pass per micro-batch)"]
        if not training.gradient_checkpointing:
            fixes.append("or set training.gradient_checkpointing=true")
    last = last_checkpoint(checkpoints)
    then = (f"the last checkpoint {last} is kept and `dvc repro` resumes from it" if last
            else "no checkpoint had been saved yet, so `dvc repro` starts over")
    return PipelineError(f"CUDA ran out of memory {where} ({memory}); {', '.join(fixes)}; {then}")
