"""Attention over packed rows (training.padding_free) without a dense mask: each example attends only to itself.

`FlatCollator` lays a micro-batch's examples end to end in one row and says where each starts
(`cu_seq_lens`, cumulative lengths, the flash-attention convention transformers passes down as keyword
arguments). Under transformers' SDPA, a packed row becomes one causal (L x L) mask with blocks on the
diagonal: the kernel computes all L^2 scores and throws most away (16 SAMSum examples: L ~ 3,400, and
15/16 of the scores are masked), and building the mask reads the position ids back to the host.

The implementation registered here ("packed") runs each example's causal attention on its own:
on CUDA with PyTorch's variable-length flash attention (`torch.nn.attention.varlen`), elsewhere with one
SDPA call per example. No mask is built. It is selected only for training with packed rows; generation
keeps SDPA.
"""

from __future__ import annotations

import inspect
from functools import cache

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

NAME = "packed"


@cache
def _varlen():
    """PyTorch's variable-length flash attention and the keyword arguments its version takes, or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    accepted = inspect.signature(varlen_attn).parameters
    causal = {"is_causal": True} if "is_causal" in accepted else {"window_size": (-1, 0)}
    return varlen_attn, causal, "enable_gqa" in accepted


def flash_available(device: torch.device) -> bool:
    """Whether this device runs the variable-length flash kernel (CUDA, compute capability 8.0 or newer)."""
    return device.type == "cuda" and _varlen() is not None and torch.cuda.get_device_capability(device) >= (8, 0)


# Resolved by register(), outside any compiled region: looking it up inside a compiled decoder layer would
# break the graph there (device queries and cached calls are not traceable).
_FLASH: tuple | None = None


def _per_example(query, key, value, starts: list[int], scaling: float) -> torch.Tensor:
    """Reference path: one causal SDPA call per example. Inputs (T, H, D); output (T, H, D)."""
    groups = query.shape[1] // key.shape[1]
    out = []
    for begin, end in zip(starts, starts[1:], strict=False):
        q, k, v = (t[begin:end].transpose(0, 1) for t in (query, key, value))  # (H, l, D)
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=0), v.repeat_interleave(groups, dim=0)
        out.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling).transpose(0, 1))
    return torch.cat(out)


def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention interface: query (1, Hq, T, D), key/value (1, Hkv, T, D) -> (1, T, Hq, D)."""
    if cu_seq_lens_q is None or query.shape[0] != 1:
        raise ValueError(
            "packed attention needs one packed row and its cu_seq_lens_q (from FlatCollator); "
            "use the 'sdpa' implementation for padded batches"
        )
    if dropout:
        raise ValueError("packed attention has no attention dropout; set the model's attention_dropout to 0")
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, H, D)
    if q.is_cuda and _FLASH is not None:
        varlen_attn, causal, takes_gqa = _FLASH
        if not takes_gqa and k.shape[1] != q.shape[1]:
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        extra = {"enable_gqa": True} if takes_gqa and k.shape[1] != q.shape[1] else {}
        cu = cu_seq_lens_q.to(torch.int32)
        dtype = q.dtype
        if dtype == torch.float32:  # a float32 residual stream (training.upcast_frozen): flash takes 16-bit only
            half = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else torch.bfloat16
            q, k, v = q.to(half), k.to(half), v.to(half)
        out = varlen_attn(q, k, v, cu, cu, max_length_q, max_length_q, scale=scaling, **causal, **extra).to(dtype)
    else:
        out = _per_example(q, k, v, cu_seq_lens_q.tolist(), scaling)
    return out[None], None


def register() -> str:
    """Make "packed" a name transformers accepts as an attention implementation; returns the name."""
    global _FLASH
    if torch.cuda.is_available() and flash_available(torch.device("cuda")):
        _FLASH = _varlen()
    AttentionInterface.register(NAME, packed_attention)
    return NAME
