"""Loading the tokenizer and the base model, and the device policy (what runs where, and why)."""

from __future__ import annotations

import logging
import resource
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from samsum_qlora import hub
from samsum_qlora.distributed import local_rank
from samsum_qlora.errors import PipelineError
from samsum_qlora.params import ModelParams, QuantizationParams

log = logging.getLogger(__name__)

# Llama 3.2 reserves this token for padding; EOS as pad would teach the model never to stop under collators
# that mask pad ids, and is ambiguous in logs.
RESERVED_PAD_TOKENS = ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>")
# Works whatever was run: `dvc repro`, `python -m stages.<name>`, or an experiment.
LOCAL_MODEL_HINT = ("set `model.base_model: path/to/folder` (made by save_pretrained) and `model.tokenizer_type: null` "
                    "in params.yaml, or `dvc exp run -S model.base_model=path/to/folder -S model.tokenizer_type=null` "
                    "for an experiment")
Loaded = TypeVar("Loaded")


@dataclass(frozen=True)
class DevicePolicy:
    device: str  # "cuda" or "cpu"
    compute_dtype: torch.dtype
    optim: str
    bf16: bool
    reason: str

    def describe(self) -> dict:
        return {"device": self.device, "compute_dtype": str(self.compute_dtype).removeprefix("torch.")}


def choose_device(quant: QuantizationParams, optim: str = "adamw_torch") -> DevicePolicy:
    """CUDA: the configured compute dtype and optimizer; CPU: fp32 compute and adamw_torch."""
    if torch.cuda.is_available():
        dtype = getattr(torch, quant.bnb_4bit_compute_dtype)
        if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            return DevicePolicy("cuda", torch.float16, optim, False, "this GPU has no bfloat16: using float16")
        return DevicePolicy("cuda", dtype, optim, dtype == torch.bfloat16, f"CUDA: {quant.bnb_4bit_compute_dtype}")
    # bf16 matmuls are ~2x slower than fp32 on CPUs without AMX, and the paged 8-bit optimizers need CUDA.
    cpu_optim = "adamw_torch" if ("8bit" in optim or "paged" in optim) else optim
    changed = []
    if quant.bnb_4bit_compute_dtype != "float32":
        changed.append(f"float32 compute instead of {quant.bnb_4bit_compute_dtype} (faster on CPU)")
    if cpu_optim != optim:
        changed.append(f"{cpu_optim} instead of {optim} (the paged 8-bit optimizers need CUDA)")
    reason = "no CUDA device, running on CPU" + (f" with {' and '.join(changed)}" if changed else "")
    return DevicePolicy("cpu", torch.float32, cpu_optim, False, reason)


def peak_memory_gib() -> float:
    """Peak memory of this process so far: allocated GPU memory on CUDA, else the resident set."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def is_local(name: str) -> bool:
    """A name that exists on disk or is spelled like a path (hub.spelled_like_path) is local; `org/name` is a hub
    id."""
    return Path(name).exists() or hub.spelled_like_path(name)


def _check_local(name: str, param: str) -> None:
    path = Path(name).expanduser()
    if is_local(name) and not path.is_dir():
        problem = "is a file" if path.exists() else "does not exist"
        raise PipelineError(
            f"{param} {name!r} {problem}; set it to a folder made by save_pretrained (config, weights, tokenizer) "
            "or to a hub id"
        )


def _load_error(name: str, param: str, err: Exception, unavailable: str | None = None) -> PipelineError:
    reason = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
    if unavailable is not None:
        from huggingface_hub import constants

        cached = Path(constants.HF_HUB_CACHE) / f"models--{name.replace('/', '--')}"
        detail = (f"the local cache ({cached}) has no complete copy of it ({reason[:200]})" if cached.is_dir()
                  else f"it is not in the local cache ({constants.HF_HUB_CACHE})")
        return hub.unavailable_error(f"could not load {param} {name!r} from the Hugging Face hub", unavailable,
                                     detail, LOCAL_MODEL_HINT)
    if Path(name).expanduser().is_dir():
        return PipelineError(
            f"{param} {name!r} could not be loaded ({reason}); it must be a complete folder made by "
            "save_pretrained: rebuild or re-download it"
        )
    return PipelineError(
        f"could not load {param} {name!r} from the Hugging Face hub ({reason}), and no local folder of that "
        "name exists; check the id and model.revision; for gated models (Llama) accept the licence on the hub "
        f"and log in with `hf auth login` or set HF_TOKEN; to use local files, set {param} to a folder made by "
        "save_pretrained"
    )


def _from_folder_hub_or_cache(load: Callable[..., Loaded], name: str, param: str) -> Loaded:
    """`load(local_files_only=...)`: from a local folder, else the hub, else (hub unusable) the local hub cache."""
    _check_local(name, param)
    unavailable = None if Path(name).expanduser().is_dir() else hub.hub_unavailable()
    try:
        if unavailable is None:
            return load(local_files_only=False)
        log.info("%s: looking for %s %r in the local cache", unavailable, param, name)
        # local_files_only alone still lets transformers ask the hub for an adapter_config.json, retrying for 23 s.
        with hub.libraries_offline():
            return load(local_files_only=True)
    except (OSError, ValueError, SafetensorError) as err:  # SafetensorError: damaged weights file
        raise _load_error(name, param, err, unavailable) from None


def load_tokenizer(model: ModelParams) -> PreTrainedTokenizerBase:
    """The tokenizer named by model.tokenizer_type (or base_model), with a chat template and a pad token."""
    name = model.tokenizer_name
    param = "model.tokenizer_type" if model.tokenizer_type else "model.base_model"
    tokenizer = _from_folder_hub_or_cache(
        lambda **hub_args: AutoTokenizer.from_pretrained(name, revision=model.revision, trust_remote_code=False,
                                                         **hub_args), name, param)
    if not tokenizer.chat_template:
        raise PipelineError(
            f"the tokenizer of {name!r} ({param}) has no chat template; set model.tokenizer_type to an "
            "instruct/chat model's tokenizer"
        )
    if tokenizer.pad_token is None:
        vocab = tokenizer.get_vocab()
        reserved = next((t for t in RESERVED_PAD_TOKENS if t in vocab), None)
        if reserved:
            tokenizer.pad_token = reserved
        elif tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            # Safe here: labels are built from masks, never from input_ids, and padding is masked out.
            log.warning("tokenizer has no pad or reserved token: padding with the EOS token")
            tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def quantization_config(quant: QuantizationParams, policy: DevicePolicy) -> BitsAndBytesConfig | None:
    if not quant.use_4bit:
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=quant.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=policy.compute_dtype,
    )


def load_config(model: ModelParams) -> PretrainedConfig:
    """The base model's config alone (sizes for the memory plan), without its weights."""
    return _from_folder_hub_or_cache(
        lambda **hub_args: AutoConfig.from_pretrained(
            model.base_model, revision=model.revision, trust_remote_code=False, **hub_args
        ), model.base_model, "model.base_model")


def load_base_model(model: ModelParams, quant: QuantizationParams, policy: DevicePolicy) -> torch.nn.Module:
    """The frozen base model, 4-bit when quantization.use_4bit, on the policy's device."""
    return _from_folder_hub_or_cache(
        lambda **hub_args: AutoModelForCausalLM.from_pretrained(
            model.base_model,
            revision=model.revision,
            quantization_config=quantization_config(quant, policy),
            dtype=policy.compute_dtype,
            device_map={"": local_rank()} if policy.device == "cuda" else "cpu",  # one GPU per process
            trust_remote_code=False,
            **hub_args,
        ), model.base_model, "model.base_model")
