"""Peak GPU memory estimates, in bytes, of a training pass and of generation, from a model's shape: pure functions.

The estimates are bytes that torch's allocator holds at the peak (what `peak_memory_gib` reads), times HEADROOM,
plus CONTEXT_GIB for the CUDA context and kernels' workspaces, which the allocator does not count. Their constants
were fitted to peaks measured on an H200 with the Llama-3.2-1B and Llama-3.1-8B shapes (compiled layers;
docs/memory.md): within 5% of every measured peak, never below one by more than 3%.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

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
        """The shape of a transformers config (a multimodal config's text part)."""
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


def generation_bytes(shape: Shape, batch: int, prompt_tokens: int, new_tokens: int, element: int) -> float:
    """What generating for one batch adds to the weights: the key/value cache of every layer for the longest
    prompt plus the new tokens, one layer's prefill activations and the float32 logits of a step."""
    cache = batch * (prompt_tokens + new_tokens) * shape.layers * 2 * shape.kv_width * element
    prefill = batch * prompt_tokens * (4 * shape.hidden + 2 * shape.intermediate) * element
    logits = batch * shape.vocab * 4 * 2
    return cache + prefill + logits


def gib(bytes_: float) -> float:
    """What an estimate of allocated bytes comes to on the GPU, in GiB: HEADROOM and CONTEXT_GIB added."""
    return bytes_ * HEADROOM / GIB + CONTEXT_GIB


def tokens_that_fit(budget_gib: float, fixed: float, per_token: float) -> int:
    """The most tokens a pass of `per_token` bytes each may have beside `fixed` bytes within `budget_gib`."""
    room = ((budget_gib - CONTEXT_GIB) / HEADROOM) * GIB - fixed
    return max(0, math.floor(room / per_token))
