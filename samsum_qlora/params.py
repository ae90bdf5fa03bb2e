"""The params.yaml schema: typed sections, validated once when a stage starts."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from samsum_qlora.errors import PipelineError

PARAMS_FILE = "params.yaml"
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")
QUANT_TYPES = ("nf4", "fp4")
SAVE_STRATEGIES = ("steps", "epoch", "no")


@dataclass(frozen=True)
class ModelParams:
    base_model: str = "meta-llama/Llama-3.2-1B-Instruct"
    tokenizer_type: str | None = None
    revision: str = "main"

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer_type or self.base_model


@dataclass(frozen=True)
class QuantizationParams:
    use_4bit: bool = True
    bnb_4bit_compute_dtype: str = "bfloat16"
    bnb_4bit_quant_type: str = "nf4"
    bnb_4bit_use_double_quant: bool = True


@dataclass(frozen=True)
class LoraParams:
    r: int = 8
    lora_alpha: int = 16
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    lora_dropout: float = 0.05


@dataclass(frozen=True)
class DataParams:
    source: str = "knkarthick/samsum"
    revision: str = "main"
    dialogue_column: str = "dialogue"
    summary_column: str = "summary"
    id_column: str = "id"
    train_samples: int | None = None
    validation_samples: int | None = None
    test_samples: int | None = None


@dataclass(frozen=True)
class PromptParams:
    instruction: str = "Summarize this dialogue in one or two sentences."
    max_length: int = 512
    date_string: str = "26 Jul 2024"


@dataclass(frozen=True)
class TrainingParams:
    num_train_epochs: float = 1
    max_steps: int = -1
    per_device_train_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    num_processes: int = 1
    max_tokens_per_micro_batch: int | None = 8192
    learning_rate: float = 2e-4
    lr_scheduler_type: str = "linear"
    warmup_steps: int = 50
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    logging_steps: int = 10
    save_strategy: str = "steps"
    save_steps: int = 100
    save_total_limit: int = 2
    eval_steps: int = 100
    per_device_eval_batch_size: int = 8
    optim: str = "paged_adamw_8bit"
    gradient_checkpointing: bool = False
    padding_free: bool = True
    dequantize: bool = True
    upcast_frozen: bool = False
    compile: bool = True
    max_memory_gib: float | None = None


@dataclass(frozen=True)
class EvalParams:
    max_new_tokens: int = 64
    batch_size: int = 256
    max_samples: int | None = None
    dequantize: bool = True
    max_memory_gib: float | None = None


@dataclass(frozen=True)
class Params:
    seed: int = 42
    model: ModelParams = field(default_factory=ModelParams)
    quantization: QuantizationParams = field(default_factory=QuantizationParams)
    lora: LoraParams = field(default_factory=LoraParams)
    data: DataParams = field(default_factory=DataParams)
    prompt: PromptParams = field(default_factory=PromptParams)
    training: TrainingParams = field(default_factory=TrainingParams)
    eval: EvalParams = field(default_factory=EvalParams)


# Range checks: key -> (predicate, what is accepted). Types are checked from the annotations.
def _positive(v: Any) -> bool:
    return v is None or v > 0


RULES: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "quantization.bnb_4bit_compute_dtype": (lambda v: v in COMPUTE_DTYPES, f"one of {', '.join(COMPUTE_DTYPES)}"),
    "quantization.bnb_4bit_quant_type": (lambda v: v in QUANT_TYPES, f"one of {', '.join(QUANT_TYPES)}"),
    "lora.r": (_positive, "an integer > 0"),
    "lora.lora_alpha": (_positive, "a number > 0"),
    "lora.target_modules": (lambda v: len(v) > 0 and all(v), "a non-empty list of module names, e.g. [q_proj, v_proj]"),
    "lora.lora_dropout": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "data.source": (bool, "a hub dataset id or a local path"),
    "data.dialogue_column": (bool, "a column name"),
    "data.summary_column": (bool, "a column name"),
    "data.id_column": (bool, "a column name"),
    "data.train_samples": (_positive, "null (all rows) or an integer > 0"),
    "data.validation_samples": (_positive, "null (all rows) or an integer > 0"),
    "data.test_samples": (_positive, "null (all rows) or an integer > 0"),
    "model.base_model": (bool, "a hub model id or a local directory"),
    "model.revision": (bool, "a branch, tag or commit"),
    "prompt.max_length": (lambda v: v >= 16, "an integer >= 16 (tokens)"),
    "training.num_train_epochs": (lambda v: v > 0, "a number > 0"),
    "training.max_steps": (lambda v: v == -1 or v > 0, "-1 (use num_train_epochs) or an integer > 0"),
    "training.per_device_train_batch_size": (_positive, "an integer > 0"),
    "training.gradient_accumulation_steps": (_positive, "an integer > 0"),
    "training.num_processes": (_positive, "an integer > 0 (data-parallel processes: one per GPU)"),
    "training.max_tokens_per_micro_batch": (_positive, "null (one pass per micro-batch) or an integer > 0 (tokens)"),
    "training.learning_rate": (_positive, "a number > 0"),
    "training.warmup_steps": (lambda v: v >= 0, "an integer >= 0"),
    "training.weight_decay": (lambda v: v >= 0, "a number >= 0"),
    "training.max_grad_norm": (lambda v: v >= 0, "a number >= 0 (0 disables clipping)"),
    "training.logging_steps": (_positive, "an integer > 0"),
    "training.save_strategy": (lambda v: v in SAVE_STRATEGIES, f"one of {', '.join(SAVE_STRATEGIES)}"),
    "training.save_steps": (_positive, "an integer > 0"),
    "training.save_total_limit": (_positive, "an integer > 0"),
    "training.eval_steps": (_positive, "an integer > 0"),
    "training.per_device_eval_batch_size": (_positive, "an integer > 0"),
    "training.max_memory_gib": (lambda v: v is None or v > 1,
                                "null (the GPU's memory) or a number of GiB > 1 (e.g. 16)"),
    "eval.max_memory_gib": (lambda v: v is None or v > 1, "null (the GPU's memory) or a number of GiB > 1 (e.g. 16)"),
    "eval.max_new_tokens": (_positive, "an integer > 0"),
    "eval.batch_size": (_positive, "an integer > 0"),
    "eval.max_samples": (_positive, "null (the whole test split) or an integer > 0"),
}


def _type_name(tp: Any) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args) + " or null"
    if typing.get_origin(tp) is list:
        return "a list of strings" if args[0] is str else f"a list of {_type_name(args[0])}"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(tp, str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Return `value` checked against the annotation `tp` (ints are accepted where numbers are)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(key, value, inner)
    if origin is list:
        if isinstance(value, str):  # a single name given on the CLI: -S lora.target_modules=q_proj
            value = [value]
        if not isinstance(value, list):
            raise _type_error(key, value, tp)
        return [_coerce(f"{key}[{i}]", v, typing.get_args(tp)[0]) for i, v in enumerate(value)]
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "2e-4" as a string
        try:
            value = float(value)
        except ValueError:
            raise _type_error(key, value, tp) from None
    ok = (
        isinstance(value, bool) if tp is bool
        else isinstance(value, int) and not isinstance(value, bool) if tp is int
        else isinstance(value, (int, float)) and not isinstance(value, bool) if tp is float
        else isinstance(value, str) if tp is str
        else False
    )
    if not ok:
        raise _type_error(key, value, tp)
    return float(value) if tp is float else value


def _type_error(key: str, value: Any, tp: Any) -> PipelineError:
    return PipelineError(f"{PARAMS_FILE}: {key} is {value!r} ({type(value).__name__}); expected {_type_name(tp)}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise PipelineError(f"{PARAMS_FILE}: {prefix.rstrip('.') or 'the file'} must be a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.4)
            hint = f"did you mean {prefix}{close[0]}? " if close else ""
            hint += f"known keys{' of ' + prefix.rstrip('.') if prefix else ''}: {', '.join(names)}"
            raise PipelineError(f"{PARAMS_FILE}: unknown key {full}; {hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            values[key] = _build(tp, value, f"{full}.")
            continue
        value = _coerce(full, value, tp)
        rule = RULES.get(full)
        if rule and not rule[0](value):
            raise PipelineError(f"{PARAMS_FILE}: {full} is {value!r}; expected {rule[1]}")
        values[key] = value
    return cls(**values)


def parse_params(raw: Any) -> Params:
    """Validate a params mapping (as read from YAML) into typed Params; missing keys take the defaults."""
    return _build(Params, raw, "")


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """Read and validate params.yaml."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path} not found: run the stage from the project root")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise PipelineError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    return parse_params(raw)
