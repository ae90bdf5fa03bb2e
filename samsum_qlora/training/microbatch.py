"""The memory budget of a training step: micro-batches run as passes of at most training.max_tokens_per_micro_batch
tokens, and the one-line message that says what to lower when CUDA runs out of memory anyway.

A pass's activation memory grows with its tokens, and SAMSum steps of 16 sequences range from ~2,000 to ~7,000
tokens: a cap bounds the peak by the pass instead of by the longest step. The Trainer still draws the same
sequences per optimizer step; a micro-batch over the cap is cut at example boundaries (batching.split_batch) and
each piece runs forward and backward on its own, its summed loss divided by the loss tokens of the whole step
(the Trainer's num_items_in_batch, see objective.summary_loss). The step's loss and gradients are therefore
those of one pass, up to float rounding; only the random draws of dropout differ, as they fall on other shapes.
Each pass has a fixed cost on top of its tokens, so every extra pass costs time: the cap trades speed for memory
(docs/memory.md: a 1B step cut into two passes ran at about half the tokens/s on an H200).

Under a memory plan that checkpoints per pass (samsum_qlora.memory.planning.TrainPlan.layers_to_checkpoint), each
pass turns activation checkpointing on for as many of the first decoder layers as its tokens need, and off for the
others.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable

import torch
from transformers import ProgressCallback, Trainer

from samsum_qlora.errors import PipelineError
from samsum_qlora.memory.planning import TrainPlan
from samsum_qlora.model.compiling import decoder_layers
from samsum_qlora.model.loading import peak_memory_gib
from samsum_qlora.params import TrainingParams
from samsum_qlora.paths import CHECKPOINTS
from samsum_qlora.training.batching import split_batch
from samsum_qlora.training.checkpoints import resume_advice
from samsum_qlora.training.objective import loss_token_count, summary_loss


class TokenCappedTrainer(Trainer):
    """transformers' Trainer, running any micro-batch of more than `max_tokens` tokens as several passes."""

    def __init__(self, *args, max_tokens: int | None = None,
                 layers_to_checkpoint: Callable[[int], int | None] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_tokens = max_tokens
        self.layers_to_checkpoint = layers_to_checkpoint  # tokens of a pass -> decoder layers it checkpoints
        self.passes = 0  # forward/backward passes run by this Trainer
        self.checkpointed_layers = 0  # summed over the passes, when checkpointing is decided per pass
        self.running_pass: int | None = None  # tokens of the pass under way; None between passes
        self._layers: list[torch.nn.Module] | None = None

    def _checkpoint_first(self, count: int) -> None:
        """Activation checkpointing on for the first `count` decoder layers, off for the rest."""
        if self._layers is None:
            self._layers = decoder_layers(self.model)
        for i, layer in enumerate(self._layers):
            layer.gradient_checkpointing = i < count
        self.checkpointed_layers += min(count, len(self._layers))

    def training_step(self, model: torch.nn.Module, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
        pieces = split_batch(inputs, self.max_tokens) if self.max_tokens else [inputs]
        if num_items_in_batch is None and len(pieces) > 1:  # the pieces share the whole micro-batch's divisor
            num_items_in_batch = loss_token_count(inputs["labels"])
        # The loss function divides by num_items_in_batch (compute_loss_func is set), so the Trainer scales nothing
        # and the pieces' losses add up to the micro-batch's.
        losses = []
        for i, piece in enumerate(pieces):
            self.running_pass = piece["input_ids"].numel()
            count = self.layers_to_checkpoint(self.running_pass) if self.layers_to_checkpoint else None
            if count is not None:
                self._checkpoint_first(count)
            # Several processes: gradients are exchanged once per micro-batch, after its last pass (processes may cut
            # their shares into different numbers of passes).
            last = i == len(pieces) - 1
            with contextlib.nullcontext() if last else self.accelerator.no_sync(model):
                losses.append(super().training_step(model, piece, num_items_in_batch))
            self.passes += 1
        self.running_pass = None
        return losses[0] if len(losses) == 1 else torch.stack(losses).sum()

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """The validation loss as the training loss is defined: the mean over all summary tokens of the split.

        Each process sums the token losses of every N-th example and counts their tokens; the sums are added over
        processes. The value is the same for any number of processes and any batching (up to float rounding),
        where the Trainer's own evaluation averages per-batch means and, on several processes, repeats examples to
        even out the last batch. With a token cap, a validation pass takes whole examples up to `max_tokens`
        tokens, as a training pass does but with no activations kept, so it never needs more memory than one;
        without one, per_device_eval_batch_size examples. The passes are collated once and reused at every
        evaluation.
        """
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        started = time.perf_counter()
        model = self.model
        model.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=self.args.device)  # summed token loss, loss tokens
        with torch.no_grad():
            for batch in self._validation_passes(dataset):
                batch = self._prepare_inputs(batch)
                with self.compute_loss_context_manager():
                    outputs = model(**{k: v for k, v in batch.items() if k != "labels"})
                tokens = loss_token_count(batch["labels"])
                sums += torch.stack([summary_loss(outputs, batch["labels"], num_items_in_batch=1).double(),
                                     tokens.double()])
        if self.args.world_size > 1:
            sums = self.accelerator.reduce(sums, reduction="sum")
        metrics = {f"{metric_key_prefix}_loss": (sums[0] / sums[1]).item(),
                   f"{metric_key_prefix}_runtime": round(time.perf_counter() - started, 4)}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _validation_passes(self, dataset) -> list[dict]:
        """This process's share of `dataset` (every N-th example), collated into passes; kept for the next call."""
        key = (getattr(dataset, "_fingerprint", id(dataset)), len(dataset), self.max_tokens,
               self.args.per_device_eval_batch_size)
        if getattr(self, "_passes_key", None) != key:
            share = [dataset[i] for i in range(self.args.process_index, len(dataset), self.args.world_size)]
            if not share:
                self._passes = []
            elif self.max_tokens:  # cut at example boundaries, as a training step is (split_batch)
                self._passes = split_batch(self.data_collator(share), self.max_tokens)
            else:
                size = self.args.per_device_eval_batch_size
                self._passes = [self.data_collator(share[i:i + size]) for i in range(0, len(share), size)]
            self._passes_key = key
        return self._passes

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
                        checkpoints: str = CHECKPOINTS, plan: TrainPlan | None = None) -> PipelineError:
    """One actionable line for running out of memory in `trainer`: where, this run's numbers (the memory switches
    as `plan` chose them; None: as set), the switches that lower memory without changing the run, and what
    `dvc repro` does next."""
    plan = plan or TrainPlan.as_set(training)
    step, tokens, cap = trainer.state.global_step, trainer.running_pass, plan.max_tokens_per_micro_batch
    memory = _memory()
    wanted = re.search(r"Tried to allocate ([\d.]+ [KMGT]iB)", str(err))
    if wanted:
        memory += f", {wanted.group(1)} more wanted"
    if training.max_memory_gib is not None:  # the allocator was held to it (samsum_qlora/memory/budget.py)
        memory += f", held to training.max_memory_gib={training.max_memory_gib:g}"
    if tokens is None and not trainer.model.training:
        where = f"computing the validation loss after step {step:,}"
        fixes = [f"lower training.max_tokens_per_micro_batch (now {cap}; it also caps a validation pass)" if cap else
                 f"lower training.per_device_eval_batch_size (now {training.per_device_eval_batch_size})"]
    else:
        where = f"at step {step + 1:,}" + (f" in a pass of {tokens:,} tokens" if tokens else "")
        below = f" below {tokens:,}" if tokens else ""
        fixes = [f"lower training.max_tokens_per_micro_batch{below} (now {cap})" if cap else
                 f"set training.max_tokens_per_micro_batch{below} (now null: one pass per micro-batch)"]
        if not plan.gradient_checkpointing:
            fixes.append("or set training.gradient_checkpointing=true")
    return PipelineError(f"CUDA ran out of memory {where} ({memory}); {', '.join(fixes)}; "
                         f"{resume_advice(checkpoints)}")
