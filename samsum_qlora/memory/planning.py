"""The memory plans: which settings of a stage fit in training.max_memory_gib / eval.max_memory_gib (pure functions).

The switches in params.yaml say how a user would like a stage to run (fastest first: the 4-bit base unpacked,
no activation checkpointing, large passes, large generation batches). A budget says what must hold. Before it
loads the weights, a stage estimates its peak GPU memory from the model's config and the data's lengths
(estimates.py); when the switches do not fit, the plan moves them towards less memory, one step at a time, in order
of the speed each step costs, and says what it chose and why. None of these switches changes a loss or a gradient
(docs/memory.md), so a planned run is the same run, only slower. The plan is the run's, not the user's: the
stage runs with its settings and records them beside the params as set, which it leaves as they are.

Training, from the fastest plan to the smallest:
  1. the switches as set, the micro-batch token cap lowered to what fits (kept only if most steps still run
     in one pass: at least the mean step's tokens);
  2. the same with the 4-bit base (training.dequantize=false);
  3. activation checkpointing, base unpacked (if it was), the cap lowered to what fits (down to the longest
     example);
  4. checkpointing with the 4-bit base, likewise.
Checkpointing the plan turns on is decided per pass: a pass checkpoints only as many decoder layers as its own
tokens need to fit (none for small passes), since every checkpointed layer runs its forward pass twice; the
plan's `pass_limits` say how many tokens fit with each number of checkpointed layers. Checkpointing set in
params.yaml stays on for every layer of every pass.
Generation: the base unpacked (eval.dequantize) if it fits with a batch of at least MIN_UNPACKED_BATCH dialogues,
else the 4-bit base; the batch halved until it fits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from samsum_qlora.errors import PipelineError
from samsum_qlora.memory.estimates import (
    LORA_STATE_BYTES,
    Shape,
    activation_bytes_per_token,
    base_bytes,
    generation_bytes,
    gib,
    lora_weights,
    tokens_that_fit,
)
from samsum_qlora.params import EvalParams, TrainingParams

MIN_UNPACKED_BATCH = 16  # generation batch under which the 4-bit base (with larger batches) is preferred


@dataclass(frozen=True)
class TrainPlan:
    """The memory switches a training run runs with: what fits its budget, or training.* as set (no budget)."""

    dequantize: bool
    gradient_checkpointing: bool  # on the model: every layer of every pass, or per pass (pass_limits)
    max_tokens_per_micro_batch: int | None
    estimate_gib: float | None  # peak allocated, HEADROOM and CONTEXT_GIB included: what is compared with the budget
    budget_gib: float | None  # None: no budget, nothing planned
    changed: tuple[str, ...]  # what differs from the params, in words
    # Checkpointing per pass: pass_limits[c] is the most tokens a pass may have with its first c decoder layers
    # checkpointed. None: checkpointing, if on, covers every layer of every pass.
    pass_limits: tuple[int, ...] | None = None
    largest_pass: int | None = None  # the most tokens a pass can have under this plan (the cap, or the data's)

    @classmethod
    def as_set(cls, training: TrainingParams) -> TrainPlan:
        """No budget to plan for: the switches as training.* sets them."""
        return cls(training.dequantize, training.gradient_checkpointing, training.max_tokens_per_micro_batch,
                   None, None, ())

    def layers_to_checkpoint(self, tokens: int) -> int | None:
        """How many decoder layers a pass of `tokens` tokens checkpoints: the fewest that let it fit (None: what
        gradient_checkpointing says, for every layer)."""
        if self.pass_limits is None:
            return None
        return next((c for c, limit in enumerate(self.pass_limits) if tokens <= limit),
                    self.pass_limits.index(max(self.pass_limits)))

    def checkpointing_steps(self) -> list[list[int]]:
        """[[most tokens, checkpointed layers], ...] for the passes this plan can meet, in increasing size."""
        if self.pass_limits is None:
            return []
        largest = self.largest_pass or self.max_tokens_per_micro_batch or max(self.pass_limits)
        steps, last = [], 0  # a number of layers with which no pass fits is left out
        for c, limit in enumerate(self.pass_limits):
            if limit > last:
                steps.append([min(limit, largest), c])
                last = limit
            if limit >= largest:
                break
        return steps

    def describe(self) -> dict[str, Any] | None:
        """The plan as the run's record shows it: budget, estimate, what changed and the settings chosen (None
        without a budget)."""
        if self.budget_gib is None:
            return None
        described = {"budget_gib": round(self.budget_gib, 2), "estimate_gib": round(self.estimate_gib, 2),
                     "changed": list(self.changed), "dequantize": self.dequantize,
                     "gradient_checkpointing": self.gradient_checkpointing,
                     "max_tokens_per_micro_batch": self.max_tokens_per_micro_batch}
        if self.pass_limits is not None:
            described["checkpointed_layers_by_pass_tokens"] = self.checkpointing_steps()
        return described


@dataclass(frozen=True)
class EvalPlan:
    """The generation settings an evaluation runs with: what fits its budget, or eval.* as set (no budget)."""

    dequantize: bool
    batch_size: int
    estimate_gib: float | None
    budget_gib: float | None  # None: no budget, nothing planned
    changed: tuple[str, ...]

    @classmethod
    def as_set(cls, eval_params: EvalParams) -> EvalPlan:
        """No budget to plan for: the settings as eval.* sets them."""
        return cls(eval_params.dequantize, eval_params.batch_size, None, None, ())

    def describe(self) -> dict[str, Any] | None:
        """Budget, estimate and what changed (None without a budget)."""
        if self.budget_gib is None:
            return None
        return {"budget_gib": round(self.budget_gib, 2), "estimate_gib": round(self.estimate_gib, 2),
                "changed": list(self.changed)}


def plan_training(shape: Shape, training: TrainingParams, budget_gib: float, *, use_4bit: bool, element: int,
                  lora_r: int, lora_targets: list[str], mean_step_tokens: float, largest_step_tokens: int,
                  longest_example: int, loss_fraction: float, double_quant: bool = True) -> TrainPlan:
    """The fastest training settings whose estimated peak fits `budget_gib` (module docstring). Per process:
    `mean_step_tokens` are an average step's tokens, `largest_step_tokens` the most a step can have (its batch of
    the longest examples), `longest_example` the longest example's."""
    lora = lora_weights(shape, lora_r, lora_targets) * LORA_STATE_BYTES
    cap = training.max_tokens_per_micro_batch
    unpacked_options = [True, False] if (use_4bit and training.dequantize) else [use_4bit and training.dequantize]
    candidates = [(unpacked, training.gradient_checkpointing) for unpacked in unpacked_options]
    if not training.gradient_checkpointing:
        candidates += [(unpacked, True) for unpacked in unpacked_options]
    tried = []
    for unpacked, checkpointing in candidates:
        fixed = base_bytes(shape, use_4bit, unpacked, element, double_quant) + lora
        # Checkpointing the plan turns on is per pass; the user's covers every layer (module docstring).
        per_pass = checkpointing and not training.gradient_checkpointing
        layer_counts = range(shape.layers + 1) if per_pass else [shape.layers if checkpointing else 0]
        limits = {c: tokens_that_fit(budget_gib, fixed, activation_bytes_per_token(shape, element, c, loss_fraction))
                  for c in layer_counts}
        fits = max(limits.values())
        tried.append(f"{_words(unpacked, checkpointing, use_4bit)}: {fits:,} tokens per pass fit")
        largest_pass = min(cap or largest_step_tokens, largest_step_tokens)
        # A lower cap, if needed: never below the longest example, and without checkpointing not below the mean
        # step either, since most steps would then be split, slower than checkpointing them (docs/memory.md).
        floor = longest_example if checkpointing else max(longest_example, math.ceil(mean_step_tokens))
        if largest_pass > fits and fits < floor:
            continue
        new_cap = cap if largest_pass <= fits else fits
        heaviest = min(new_cap or largest_pass, largest_pass)
        # The peak: each number of checkpointed layers a pass may use, at the largest pass it is used for.
        most = min(c for c, limit in limits.items() if limit >= heaviest)  # what the heaviest pass uses
        estimate = max(gib(fixed + min(limit, heaviest) * activation_bytes_per_token(shape, element, c, loss_fraction))
                       for c, limit in limits.items() if c <= most)
        changed = []
        if unpacked != (use_4bit and training.dequantize):
            changed.append("training.dequantize=false (the 4-bit base)")
        if per_pass:
            changed.append("training.gradient_checkpointing=true (per pass, of the layers the pass needs)")
        if new_cap != cap:
            changed.append(f"training.max_tokens_per_micro_batch={new_cap} (from {cap})")
        return TrainPlan(unpacked if use_4bit else training.dequantize, checkpointing, new_cap, estimate,
                         budget_gib, tuple(changed), tuple(limits.values()) if per_pass else None, heaviest)
    smallest = base_bytes(shape, use_4bit, False, element, double_quant) + lora + longest_example * (
        activation_bytes_per_token(shape, element, True, loss_fraction))
    raise PipelineError(
        f"training.max_memory_gib={budget_gib:g}: this model needs about {gib(smallest):.1f} GiB even with "
        f"{'the 4-bit base, ' if use_4bit else ''}activation checkpointing and one {longest_example}-token example "
        "per pass "
        f"({'; '.join(tried)}); raise training.max_memory_gib, lower prompt.max_length or use a smaller base"
    )


def _words(unpacked: bool, checkpointing: bool, use_4bit: bool) -> str:
    base = ("base unpacked" if unpacked else "4-bit base") if use_4bit else "unquantized base"
    return f"{base}, {'checkpointing' if checkpointing else 'no checkpointing'}"


def plan_generation(shape: Shape, eval_params: EvalParams, budget_gib: float, *, use_4bit: bool, element: int,
                    longest_prompt: int, double_quant: bool = True) -> EvalPlan:
    """The fastest generation settings that fit `budget_gib` (module docstring); an adapter's weights (well
    under 1% of the base's) are left out."""
    options = [True, False] if (use_4bit and eval_params.dequantize) else [use_4bit and eval_params.dequantize]
    for unpacked in options:
        fixed = base_bytes(shape, use_4bit, unpacked, element, double_quant)
        batch = eval_params.batch_size
        while batch > 1 and gib(fixed + generation_bytes(shape, batch, longest_prompt, eval_params.max_new_tokens,
                                                         element)) > budget_gib:
            batch //= 2
        estimate = gib(fixed + generation_bytes(shape, batch, longest_prompt, eval_params.max_new_tokens, element))
        if estimate > budget_gib:
            continue
        if unpacked and len(options) > 1 and batch < min(MIN_UNPACKED_BATCH, eval_params.batch_size):
            continue  # unpacked weights with tiny batches: the 4-bit base with larger ones generates faster
        changed = []
        if unpacked != (use_4bit and eval_params.dequantize):
            changed.append("eval.dequantize=false (the 4-bit base)")
        if batch != eval_params.batch_size:
            changed.append(f"eval.batch_size={batch} (from {eval_params.batch_size})")
        return EvalPlan(unpacked if use_4bit else eval_params.dequantize, batch, estimate, budget_gib, tuple(changed))
    raise PipelineError(
        f"eval.max_memory_gib={budget_gib:g}: generating one {longest_prompt}-token prompt needs about "
        f"{estimate:.1f} GiB even with the 4-bit base; raise eval.max_memory_gib or use a smaller base"
    )
