"""The LoRA adapter folder (checked, then loaded onto the base) and the model made ready for generation."""

from __future__ import annotations

from pathlib import Path

import torch

from samsum_qlora.errors import PipelineError
from samsum_qlora.memory.planning import EvalPlan
from samsum_qlora.model.loading import DevicePolicy, load_base_model
from samsum_qlora.params import Params
from samsum_qlora.paths import ADAPTER

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # safetensors only: never a pickle


def check_adapter(path: str = ADAPTER) -> None:
    """Fail before any model is loaded when the adapter folder lacks its config or safetensors weights."""
    missing = [name for name in ADAPTER_FILES if not (Path(path) / name).is_file()]
    if missing:
        raise PipelineError(
            f"{path}/ has no {' or '.join(missing)}: run `dvc repro train` (or `dvc checkout {path}`) first"
        )


def load_adapter(base: torch.nn.Module, path: str = ADAPTER) -> torch.nn.Module:
    """The adapter at `path` on top of `base` (a peft model), or one line saying how to restore a damaged folder."""
    from peft import PeftModel

    check_adapter(path)
    try:
        return PeftModel.from_pretrained(base, path)
    except Exception as err:  # peft raises many types for a damaged file
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        raise PipelineError(
            f"{path}/ could not be loaded ({type(err).__name__}: {reason}); "
            f"restore it from the DVC cache with `dvc checkout --force {path}` (seconds; --force because it replaces "
            f"the damaged files), or re-create it with `dvc repro -f train` (trains again from scratch)"
        ) from None


def load_for_generation(params: Params, policy: DevicePolicy, adapter: str | None,
                        plan: EvalPlan | None = None) -> torch.nn.Module:
    """The base model (with the adapter, if given) ready for generation, unpacked as the memory plan says (None: as
    eval.dequantize says).

    With eval.dequantize, the 4-bit weights are unpacked once to the compute dtype and the adapter is merged
    into them: the weights the adapter was trained against, without a dequantization in every matmul of
    every generated token (the 4-bit kernels' cost at generation time).
    """
    model = load_base_model(params.model, params.quantization, policy)
    unpack = (plan or EvalPlan.as_set(params.eval)).dequantize and params.quantization.use_4bit
    if unpack:
        model = model.dequantize(dtype=policy.compute_dtype)
    if adapter:
        model = load_adapter(model, adapter)
        if unpack:
            model = model.merge_and_unload()
    return model.eval()
