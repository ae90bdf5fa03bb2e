"""The memory budget: which settings of a stage fit in training.max_memory_gib / eval.max_memory_gib.

The switches in params.yaml say how a user would like a stage to run (fastest first: the 4-bit base unpacked,
no activation checkpointing, large passes, large generation batches). A budget says what must hold. Before it
loads the weights, a stage estimates its peak GPU memory from the model's config and the data's lengths; when
the switches do not fit, it moves them towards less memory, one step at a time, in order of the speed each
step costs, and says what it chose and why. None of these switches changes a loss or a gradient (README,
Performance), so a planned run is the same run, only slower.

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

The estimates are bytes that torch's allocator holds at the peak (what `peak_memory_gib` reads), times
HEADROOM, plus CONTEXT_GIB for the CUDA context and kernels' workspaces, which the allocator does not count.
Their constants were fitted to peaks measured on an H200 with the Llama-3.2-1B and Llama-3.1-8B shapes (compiled
layers; README, Memory budget): within 5% of every measured peak, never below one by more than 3%.
A stage given an explicit budget also caps torch's allocator at it, so a wrong estimate ends in the
out-of-memory line (which names the budget), never in more memory than the user allowed.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, replace
from typing import Any

import torch

from samsum_qlora.errors import PipelineError
from samsum_qlora.params import EvalParams, TrainingParams

log = logging.getLogger(__name__)

GIB = 2**30
HEADROOM = 1.10  # allocator rounding and fragmentation, on top of the estimate
CONTEXT_GIB = 1.0  # CUDA context, cuBLAS/attention workspaces: outside torch's allocator count
# Elements a compiled decoder layer keeps per token for its backward pass: ~6 of the hidden size (norm outputs,
# residual, attention input and output), 2 of the key/value width (rotated k and v) and 3 of the MLP width (gate,
# up, activation); the summary-only loss keeps LOGIT_BYTES per logit of the loss tokens (bf16 logits, their float
# copy for the loss and its gradient).
SAVED_HIDDEN, SAVED_KV, SAVED_MLP = 6, 2, 3
LOGIT_BYTES = 9
# Checkpointing some layers only: the backward pass's temporaries of the layer it works on, in layers' worth of
# saved activations (fitted to the 8B shape's peaks with 26, 30 and 31 of 32 layers checkpointed; with none or all
# checkpointed, the constants above already hold them).
PARTIAL_BACKWARD_LAYERS = 0.5
NF4_BYTES = 0.5  # per weight of a 4-bit linear layer, plus its block constants:
BLOCK_CONSTANTS_BYTES = {True: 1 / 64 + 4 / (64 * 256), False: 4 / 64}  # double quant: 8-bit absmax per 64 weights
LORA_STATE_BYTES = 16  # per trainable weight: float32 weight and gradient, 8-bit Adam states, rounding
MIN_UNPACKED_BATCH = 16  # generation batch under which the 4-bit base (with larger batches) is preferred


@dataclass(frozen=True)
class Shape:
    """What the estimates need of a decoder-only model, read from its config."""

    hidden: int
    intermediate: int
    layers: int
    vocab: int
    q_width: int  # attention heads x head size
    kv_width: int  # key/value heads x head size
    tied: bool

    @classmethod
    def from_config(cls, config: Any) -> Shape:
        config = getattr(config, "text_config", None) or config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return cls(config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size,
                   heads * head_dim, kv_heads * head_dim, bool(getattr(config, "tie_word_embeddings", False)))

    @property
    def linear_weights(self) -> int:
        """Weights of the decoder layers' linear layers (what 4-bit quantization packs)."""
        attention = 2 * self.hidden * self.q_width + 2 * self.hidden * self.kv_width
        return self.layers * (attention + 3 * self.hidden * self.intermediate)

    @property
    def embedding_weights(self) -> int:
        """Input embeddings and output head (one matrix when tied), which stay in the compute dtype."""
        return self.vocab * self.hidden * (1 if self.tied else 2)


@dataclass(frozen=True)
class TrainPlan:
    dequantize: bool
    gradient_checkpointing: bool
    max_tokens_per_micro_batch: int | None
    estimate_gib: float  # peak allocated, HEADROOM and CONTEXT_GIB included: what is compared with the budget
    budget_gib: float
    changed: tuple[str, ...]  # what differs from the params, in words
    # Checkpointing per pass: pass_limits[c] is the most tokens a pass may have with its first c decoder layers
    # checkpointed. None: checkpointing, if on, covers every layer of every pass.
    pass_limits: tuple[int, ...] | None = None
    largest_pass: int | None = None  # the most tokens a pass can have under this plan (the cap, or the data's)

    def apply(self, training: TrainingParams) -> TrainingParams:
        return replace(training, dequantize=self.dequantize, gradient_checkpointing=self.gradient_checkpointing,
                       max_tokens_per_micro_batch=self.max_tokens_per_micro_batch)

    def layers_to_checkpoint(self, tokens: int) -> int | None:
        """How many decoder layers a pass of `tokens` tokens checkpoints: the fewest that let it fit (None: what
        training.gradient_checkpointing says, for every layer)."""
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

    def describe(self) -> dict[str, Any]:
        described = {"budget_gib": round(self.budget_gib, 2), "estimate_gib": round(self.estimate_gib, 2),
                     "changed": list(self.changed)}
        if self.pass_limits is not None:
            described["checkpointed_layers_by_pass_tokens"] = self.checkpointing_steps()
        return described


@dataclass(frozen=True)
class EvalPlan:
    dequantize: bool
    batch_size: int
    estimate_gib: float
    budget_gib: float
    changed: tuple[str, ...]

    def apply(self, eval_params: EvalParams) -> EvalParams:
        return replace(eval_params, dequantize=self.dequantize, batch_size=self.batch_size)

    def describe(self) -> dict[str, Any]:
        return {"budget_gib": round(self.budget_gib, 2), "estimate_gib": round(self.estimate_gib, 2),
                "changed": list(self.changed)}


def base_bytes(shape: Shape, use_4bit: bool, unpacked: bool, element: int, double_quant: bool = True) -> float:
    """The frozen base's weights on the GPU: 4-bit linear layers (or unpacked to `element` bytes) and the
    embeddings in the compute dtype."""
    if use_4bit and not unpacked:
        linear = shape.linear_weights * (NF4_BYTES + BLOCK_CONSTANTS_BYTES[double_quant])
    else:
        linear = shape.linear_weights * element
    return linear + shape.embedding_weights * element


def lora_weights(shape: Shape, r: int, targets: list[str]) -> int:
    """Trainable weights of rank-r adapters on the named projections (names as in Llama-style models)."""
    sizes = {"q_proj": (shape.hidden, shape.q_width), "k_proj": (shape.hidden, shape.kv_width),
             "v_proj": (shape.hidden, shape.kv_width), "o_proj": (shape.q_width, shape.hidden),
             "gate_proj": (shape.hidden, shape.intermediate), "up_proj": (shape.hidden, shape.intermediate),
             "down_proj": (shape.intermediate, shape.hidden)}
    per_layer = sum(r * (fan_in + fan_out) for name, (fan_in, fan_out) in sizes.items() if name in targets)
    return shape.layers * per_layer


def layer_bytes_per_token(shape: Shape, element: int) -> float:
    """Activations one decoder layer keeps for its backward pass, per token."""
    return (SAVED_HIDDEN * shape.hidden + SAVED_KV * shape.kv_width + SAVED_MLP * shape.intermediate) * element


def activation_bytes_per_token(shape: Shape, element: int, checkpointing: bool | int, loss_fraction: float) -> float:
    """Activations of a training pass per token, `checkpointing` every layer (True), none (False) or the first
    `checkpointing` layers: each checkpointed layer keeps its input, every other layer all it saves, and while
    the backward pass recomputes a checkpointed layer the layers after it have been freed, so at least one
    layer's activations are held; plus the loss tokens' logits."""
    checkpointed = shape.layers if checkpointing is True else int(checkpointing)
    held = max(shape.layers - checkpointed, min(checkpointed, 1))  # layers whose activations are held at once
    if 0 < checkpointed < shape.layers:
        held += PARTIAL_BACKWARD_LAYERS
    layers = checkpointed * shape.hidden * element + held * layer_bytes_per_token(shape, element)
    return layers + loss_fraction * shape.vocab * LOGIT_BYTES


def training_bytes(shape: Shape, tokens: int, *, use_4bit: bool, unpacked: bool, checkpointing: bool, element: int,
                   loss_fraction: float, lora_r: int = 8, lora_targets: tuple[str, ...] = ("q_proj", "v_proj"),
                   double_quant: bool = True) -> float:
    """Estimated peak bytes torch's allocator holds in a training pass of `tokens` tokens (no headroom, no
    context)."""
    fixed = base_bytes(shape, use_4bit, unpacked, element, double_quant)
    fixed += lora_weights(shape, lora_r, list(lora_targets)) * LORA_STATE_BYTES
    return fixed + tokens * activation_bytes_per_token(shape, element, checkpointing, loss_fraction)


def _gib(bytes_: float) -> float:
    return bytes_ * HEADROOM / GIB + CONTEXT_GIB


def _tokens_that_fit(budget_gib: float, fixed: float, per_token: float) -> int:
    room = ((budget_gib - CONTEXT_GIB) / HEADROOM) * GIB - fixed
    return max(0, math.floor(room / per_token))


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
        limits = {c: _tokens_that_fit(budget_gib, fixed, activation_bytes_per_token(shape, element, c, loss_fraction))
                  for c in layer_counts}
        fits = max(limits.values())
        tried.append(f"{_words(unpacked, checkpointing, use_4bit)}: {fits:,} tokens per pass fit")
        largest_pass = min(cap or largest_step_tokens, largest_step_tokens)
        # A lower cap, if needed: never below the longest example, and without checkpointing not below the mean
        # step either, since most steps would then be split, slower than checkpointing them (README, Memory budget).
        floor = longest_example if checkpointing else max(longest_example, math.ceil(mean_step_tokens))
        if largest_pass > fits and fits < floor:
            continue
        new_cap = cap if largest_pass <= fits else fits
        heaviest = min(new_cap or largest_pass, largest_pass)
        # The peak: each number of checkpointed layers a pass may use, at the largest pass it is used for.
        most = min(c for c, limit in limits.items() if limit >= heaviest)  # what the heaviest pass uses
        estimate = max(_gib(fixed + min(limit, heaviest) * activation_bytes_per_token(shape, element, c, loss_fraction))
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
        f"training.max_memory_gib={budget_gib:g}: this model needs about {_gib(smallest):.1f} GiB even with "
        f"{'the 4-bit base, ' if use_4bit else ''}activation checkpointing and one {longest_example}-token example "
        "per pass "
        f"({'; '.join(tried)}); raise training.max_memory_gib, lower prompt.max_length or use a smaller base"
    )


def _words(unpacked: bool, checkpointing: bool, use_4bit: bool) -> str:
    base = ("base unpacked" if unpacked else "4-bit base") if use_4bit else "unquantized base"
    return f"{base}, {'checkpointing' if checkpointing else 'no checkpointing'}"


def generation_bytes(shape: Shape, batch: int, prompt_tokens: int, new_tokens: int, element: int) -> float:
    """What generating for one batch adds to the weights: the key/value cache of every layer for the longest
    prompt plus the new tokens, one layer's prefill activations and the float32 logits of a step."""
    cache = batch * (prompt_tokens + new_tokens) * shape.layers * 2 * shape.kv_width * element
    prefill = batch * prompt_tokens * (4 * shape.hidden + 2 * shape.intermediate) * element
    logits = batch * shape.vocab * 4 * 2
    return cache + prefill + logits


def plan_generation(shape: Shape, eval_params: EvalParams, budget_gib: float, *, use_4bit: bool, element: int,
                    longest_prompt: int, double_quant: bool = True) -> EvalPlan:
    """The fastest generation settings that fit `budget_gib` (module docstring); an adapter's weights (well
    under 1% of the base's) are left out."""
    options = [True, False] if (use_4bit and eval_params.dequantize) else [use_4bit and eval_params.dequantize]
    for unpacked in options:
        fixed = base_bytes(shape, use_4bit, unpacked, element, double_quant)
        batch = eval_params.batch_size
        while batch > 1 and _gib(fixed + generation_bytes(shape, batch, longest_prompt, eval_params.max_new_tokens,
                                                          element)) > budget_gib:
            batch //= 2
        estimate = _gib(fixed + generation_bytes(shape, batch, longest_prompt, eval_params.max_new_tokens, element))
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


def budget_gib(configured: float | None, device: str) -> tuple[float | None, str]:
    """The budget in GiB and where it comes from: the param, else the GPU's memory (None on CPU with no param:
    no plan). The whole card, not what is free when the stage starts: the same params give the same plan, and
    experiments sharing a GPU (`dvc queue start -j N`) set their budgets (README, Experiments and sweeps)."""
    if configured is not None:
        return float(configured), "set"
    if device != "cuda":
        return None, "no GPU"
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return total / GIB, "the GPU's memory"


def adopt(plan: TrainPlan | EvalPlan, source: str, configured: float | None, device: str,
          stage_log: logging.Logger) -> None:
    """Say on the stage's log what the plan changed, with the budget (and where it comes from) and the estimate;
    for a budget set in params, hold torch's allocator to it."""
    said = f"memory budget {plan.budget_gib:.1f} GiB ({source}), estimated peak {plan.estimate_gib:.1f} GiB"
    if plan.changed:
        stage_log.info("%s with %s: the settings as given would not fit", said, ", ".join(plan.changed))
        if isinstance(plan, TrainPlan) and plan.pass_limits is not None:
            steps = plan.checkpointing_steps()
            (first_tokens, first_layers), (last_tokens, last_layers) = steps[0], steps[-1]
            stage_log.info("checkpointing per pass: %d of %d decoder layers for passes of up to %s tokens, ..., "
                           "%d for the largest (%s tokens); train_run.json lists every step", first_layers,
                           len(plan.pass_limits) - 1, f"{first_tokens:,}", last_layers, f"{last_tokens:,}")
    else:
        stage_log.info("%s: the settings fit as given", said)
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
