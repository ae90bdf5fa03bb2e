"""The base model made ready for training: frozen, set up as the training.* switches (or the memory plan) say, and
wrapped with seeded LoRA adapters."""

from __future__ import annotations

import logging

import torch
from peft import LoraConfig, get_peft_model
from transformers import set_seed

from samsum_qlora import distributed
from samsum_qlora.errors import PipelineError
from samsum_qlora.memory.planning import TrainPlan
from samsum_qlora.model import attention
from samsum_qlora.model.compiling import compile_layers
from samsum_qlora.model.loading import DevicePolicy
from samsum_qlora.params import Params

log = logging.getLogger(__name__)


def linear_module_names(model: torch.nn.Module) -> set[str]:
    """Leaf names of the model's linear layers (what lora.target_modules may name)."""
    return {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}


def check_target_modules(model: torch.nn.Module, targets: list[str]) -> None:
    """Fail with the model's linear layer names when lora.target_modules names one it does not have."""
    available = linear_module_names(model)
    missing = [t for t in targets if t not in available]
    if missing:
        raise PipelineError(
            f"params.yaml: lora.target_modules names {missing}, which this model does not have; "
            f"its linear layers are: {', '.join(sorted(available))}"
        )


def prepare_base(base: torch.nn.Module, params: Params, policy: DevicePolicy,
                 plan: TrainPlan | None = None) -> torch.nn.Module:
    """Freeze the base and set it up for training as the training.* switches say (see docs/performance.md); the
    memory switches as `plan` chose them (None: as set)."""
    t = params.training
    plan = plan or TrainPlan.as_set(t)
    # A KV cache is useless in training, and its presence stops transformers from reading packed sequences.
    base.config.use_cache = False
    if params.quantization.use_4bit and plan.dequantize:
        # The NF4 weights unpacked once to the compute dtype: the values the 4-bit kernels compute with, without
        # unpacking every weight again in every forward and backward matmul.
        base = base.dequantize(dtype=policy.compute_dtype)
    for param in base.parameters():
        param.requires_grad_(False)
    if t.upcast_frozen:
        # What peft's prepare_model_for_kbit_training does: the frozen layers that are not 4-bit (embeddings,
        # norms, head) in float32, so the residual stream runs in float32 under autocast.
        for param in base.parameters():
            if param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ != "Params4bit":
                param.data = param.data.float()
    if t.padding_free:
        base.set_attn_implementation(attention.register())
    if plan.gradient_checkpointing:
        enable_checkpointing(base)
    return base


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant activation checkpointing (the reentrant kind drops gradients of inputs that don't require
    them). transformers 5.24 renamed gradient_checkpointing_enable (still there, deprecated); 5.17 has only it."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def checkpointing_on(model: torch.nn.Module) -> bool:
    """Whether activation checkpointing is on (transformers 5.24 renamed is_gradient_checkpointing, 5.17 has
    only the old name)."""
    name = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else (
        "is_gradient_checkpointing")
    return bool(getattr(model, name, False))


def add_lora(base: torch.nn.Module, params: Params, policy: DevicePolicy,
             plan: TrainPlan | None = None) -> torch.nn.Module:
    """The base prepared for training (prepare_base) and wrapped with seeded LoRA adapters, its decoder layers
    compiled on CUDA when training.compile says so."""
    check_target_modules(base, params.lora.target_modules)
    base = prepare_base(base, params, policy, plan)
    set_seed(params.seed)  # LoRA's A matrices are initialised randomly inside get_peft_model
    config = LoraConfig(
        r=params.lora.r,
        lora_alpha=params.lora.lora_alpha,
        target_modules=list(params.lora.target_modules),
        lora_dropout=params.lora.lora_dropout,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config)
    if params.training.compile:
        if policy.device == "cuda":
            log.info("compiled %d decoder layers (the first steps are slower)",
                     compile_layers(model, in_worker=distributed.in_worker()))
        else:
            log.info("training.compile applies on CUDA only: running eagerly on %s", policy.device)
    return model
