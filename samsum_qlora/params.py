"""The params.yaml schema: every key's type, range, default and meaning, validated once when a stage starts.

    python -m samsum_qlora.params --markdown > docs/params.md   # the reference page, generated from this schema
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AllowInfNan, BeforeValidator, ConfigDict, Field, Strict, TypeAdapter, ValidationError, with_config

from samsum_qlora.errors import PipelineError
from samsum_qlora.params_text import fields_of, one_line_error, reference_cli
from samsum_qlora.paths import PARAMS

PARAMS_FILE = PARAMS
SCHEMA = ConfigDict(extra="forbid")


def yaml_number(value: Any) -> Any:
    """YAML 1.1 reads "2e-4" as a string: a number written so still counts as one."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _one_or_many(value: Any) -> Any:
    return [value] if isinstance(value, str) else value  # a single name given on the CLI: -S lora.target_modules=q_proj


# YAML's types, strictly: "8" is not an integer, 2.5 is not one either, "yes" is not true; an integer is a number;
# .inf and .nan (or "inf" from the CLI) are not numbers a run can use.
Int = Annotated[int, Strict()]
Number = Annotated[float, BeforeValidator(yaml_number), Strict(), AllowInfNan(False)]
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]
Names = Annotated[list[Annotated[str, Strict(), Field(min_length=1)]], BeforeValidator(_one_or_many)]


def param(about: str, *, means: str | None = None, noun: str | None = None, unit: str | None = None,
          note: str | None = None, **constraints: Any) -> Any:
    """A key's meaning (`about`) and constraints; `means` says what null (or the one special value) does, and
    `noun`, `unit` and `note` complete how its accepted values read in an error."""
    words = {k: v for k, v in {"means": means, "noun": noun, "unit": unit, "note": note}.items() if v}
    return Field(description=about, json_schema_extra=words or None, **constraints)


# Plain frozen dataclasses (dataclasses.replace and asdict work, and do not validate); pydantic validates the
# mapping read from params.yaml against them once, in parse_params.
@with_config(SCHEMA)
@dataclass(frozen=True)
class ModelParams:
    base_model: Annotated[Str, param("hub id or local directory of the base chat model (Llama 3.2 is gated: it needs "
                                     "a Hugging Face token)", noun="a hub model id or a local directory",
                                     min_length=1)] = "meta-llama/Llama-3.2-1B-Instruct"
    tokenizer_type: Annotated[Str | None, param("hub id or local directory of the tokenizer (with a chat template); "
                                                "null = the same as base_model")] = "meta-llama/Llama-3.2-1B-Instruct"
    revision: Annotated[Str, param("hub branch, tag or commit of model and tokenizer; pin a commit to reproduce "
                                   "exactly", noun="a branch, tag or commit", min_length=1)] = "main"

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer_type or self.base_model


@with_config(SCHEMA)
@dataclass(frozen=True)
class QuantizationParams:
    use_4bit: Annotated[Bool, param("load the frozen base in 4 bit (QLoRA); false = plain LoRA on an unquantized "
                                    "base")] = True
    bnb_4bit_compute_dtype: Annotated[Literal["bfloat16", "float16", "float32"], param(
        "dtype of the 4-bit matmuls; on CPU float32 is used (said in the log)")] = "bfloat16"
    bnb_4bit_quant_type: Annotated[Literal["nf4", "fp4"], param("4-bit data type of the base's weights")] = "nf4"
    bnb_4bit_use_double_quant: Annotated[Bool, param("also quantize the quantization constants (saves ~0.4 "
                                                     "bit/param)")] = True


@with_config(SCHEMA)
@dataclass(frozen=True)
class LoraParams:
    r: Annotated[Int, param("rank of the update matrices", gt=0)] = 8
    lora_alpha: Annotated[Int, param("scaling numerator: the update is scaled by lora_alpha / r", gt=0)] = 16
    target_modules: Annotated[Names, param("names of the linear layers that get adapters", min_length=1,
                                           noun="module names, e.g. [q_proj, v_proj]")] = field(
        default_factory=lambda: ["q_proj", "v_proj"])
    lora_dropout: Annotated[Number, param("dropout on the adapter input", ge=0, lt=1)] = 0.05


@with_config(SCHEMA)
@dataclass(frozen=True)
class DataParams:
    source: Annotated[Str, param("hub dataset id, or a local file/folder (json, jsonl, csv, parquet; docs/data.md)",
                                 noun="a hub dataset id or a local path",
                                 min_length=1)] = "knkarthick/samsum"
    revision: Annotated[Str, param("hub branch, tag or commit of the dataset (ignored for local files)")] = "main"
    dialogue_column: Annotated[Str, param("column holding the conversation", noun="a column name",
                                          min_length=1)] = "dialogue"
    summary_column: Annotated[Str, param("column holding the reference summary", noun="a column name",
                                         min_length=1)] = "summary"
    id_column: Annotated[Str, param("column holding a row id; optional in the data: a stable id is derived from the "
                                    "text when absent", noun="a column name", min_length=1)] = "id"
    train_samples: Annotated[Int | None, param("rows of the train split: N = a seeded sample of N rows",
                                               means="all rows", gt=0)] = None
    validation_samples: Annotated[Int | None, param("rows of the validation split, as train_samples",
                                                    means="all rows", gt=0)] = None
    test_samples: Annotated[Int | None, param("rows of the test split, as train_samples", means="all rows",
                                              gt=0)] = None


@with_config(SCHEMA)
@dataclass(frozen=True)
class PromptParams:
    instruction: Annotated[Str, param("the user turn, followed by the dialogue")] = (
        "Summarize this dialogue in one or two sentences.")
    max_length: Annotated[Int, param("tokens per training example and per evaluation prompt; a long dialogue is cut "
                                     "at its end, never the summary", note="tokens", ge=16)] = 512
    date_string: Annotated[Str, param("fixed date for chat templates that print today's date (Llama 3.x)")] = (
        "26 Jul 2024")


@with_config(SCHEMA)
@dataclass(frozen=True)
class TrainingParams:
    num_train_epochs: Annotated[Number, param("passes over the training split", gt=0)] = 1.0
    max_steps: Annotated[Literal[-1] | Annotated[Int, Field(gt=0)], param(
        "> 0 stops after this many optimizer steps instead (quick runs)", means="use num_train_epochs")] = -1
    per_device_train_batch_size: Annotated[Int, param(
        "sequences per process and micro-batch; sequences per optimizer step = this x gradient_accumulation_steps, "
        "split between the processes", gt=0)] = 16
    gradient_accumulation_steps: Annotated[Int, param(
        "micro-batches per optimizer step (16 x 1: the tutorial's 4 x 4 loss, in one pass)", gt=0)] = 1
    num_processes: Annotated[Int, param(
        "data-parallel processes, one per GPU, for training and both evaluations; the train batch size must divide "
        "by it (docs/multi-gpu.md)", note="data-parallel processes: one per GPU", gt=0)] = 1
    max_tokens_per_micro_batch: Annotated[Int | None, param(
        "a micro-batch of more tokens (padded: rows x longest row) runs as several forward/backward passes cut "
        "between examples: the same loss and gradients, less memory, slower (docs/memory.md)",
        means="one pass per micro-batch", note="tokens", gt=0)] = 8192
    learning_rate: Annotated[Number, param("peak learning rate", gt=0)] = 2e-4
    lr_scheduler_type: Annotated[Str, param("any transformers scheduler name: linear | cosine | "
                                            "constant_with_warmup | ...")] = "linear"
    warmup_ratio: Annotated[Number, param("warmup to the peak learning rate as a share of the run's optimizer steps "
                                          "(0.054: 50 of the default job's 921)", ge=0, lt=1)] = 0.054
    warmup_steps: Annotated[Int | None, param("optimizer steps of warmup; overrides warmup_ratio when set",
                                              means="use warmup_ratio", ge=0)] = None
    weight_decay: Annotated[Number, param("AdamW weight decay", ge=0)] = 0.0
    max_grad_norm: Annotated[Number, param("gradient clipping norm", note="0 disables clipping", ge=0)] = 1.0
    logging_steps: Annotated[Int, param("train loss is logged (and plotted) every N optimizer steps", gt=0)] = 10
    nonfinite_patience: Annotated[Int, param(
        "stop when the logged loss or grad_norm is inf/NaN at N logged steps in a row; 2 lets fp16's loss scaler "
        "skip one overflowing step, while NaN weights never recover", gt=0)] = 2
    save_strategy: Annotated[Literal["steps", "epoch", "no"], param("when checkpoints are written")] = "steps"
    save_steps: Annotated[Int, param("checkpoint into models/checkpoints/ every N steps (resume after "
                                     "interruption)", gt=0)] = 100
    save_total_limit: Annotated[Int, param("checkpoints kept on disk", gt=0)] = 2
    eval_steps: Annotated[Int, param("validation loss every N steps", gt=0)] = 100
    per_device_eval_batch_size: Annotated[Int, param(
        "validation examples per pass when max_tokens_per_micro_batch is null; with a cap, a pass takes whole "
        "examples up to it", gt=0)] = 8
    optim: Annotated[Str, param("any transformers optimizer; on CPU adamw_torch is used instead (said in the "
                                "log)")] = "paged_adamw_8bit"
    padding_free: Annotated[Bool, param("lay a micro-batch's examples end to end, each attending only to itself; "
                                        "false = pad to the longest example, as the tutorial did")] = True
    dequantize: Annotated[Bool, param("train over the NF4 base unpacked once to the compute dtype: the same "
                                      "weights, faster, 2 bytes/weight instead of ~0.6; false = the 4-bit "
                                      "kernels")] = True
    compile: Annotated[Bool, param("torch.compile the decoder layers (CUDA only): ~1.5x faster, less activation "
                                   "memory, 20-30 s of compiling; false = eager")] = True
    gradient_checkpointing: Annotated[Bool, param("recompute activations in the backward pass: ~half the memory, "
                                                  "~1.8x slower")] = False
    upcast_frozen: Annotated[Bool, param("frozen embeddings and norms in float32 (peft's "
                                         "prepare_model_for_kbit_training): slower, and more memory")] = False
    deterministic: Annotated[Bool, param("bit-identical reruns on the same machine: deterministic kernels only, "
                                         "slower (docs/performance.md); false = the fastest, varying on a GPU")] = False
    max_memory_gib: Annotated[Number | None, param(
        "GPU memory the stage may use; when the switches above would not fit, the stage picks the fastest "
        "settings that do and says so (docs/memory.md)", means="the GPU's memory", unit="GiB",
        note="e.g. 16", gt=1)] = None


@with_config(SCHEMA)
@dataclass(frozen=True)
class EvalParams:
    max_new_tokens: Annotated[Int, param("generation budget per summary (SAMSum summaries are ~25 tokens)",
                                         gt=0)] = 64
    batch_size: Annotated[Int, param("dialogues generated together (sorted by length, left-padded)", gt=0)] = 256
    max_samples: Annotated[Int | None, param("rows of the test split to evaluate: N = its first N (quick runs)",
                                             means="the whole test split", gt=0)] = None
    dequantize: Annotated[Bool, param("generate with the 4-bit base unpacked to the compute dtype and the adapter "
                                      "merged in: the same weights, several times faster; false = 4-bit "
                                      "kernels")] = True
    max_memory_gib: Annotated[Number | None, param(
        "GPU memory for generation; the 4-bit base and smaller batches are used when the settings above would not "
        "fit", means="the GPU's memory", unit="GiB", note="e.g. 16", gt=1)] = None


@with_config(SCHEMA)
@dataclass(frozen=True)
class Params:
    seed: Annotated[Int, param("seeds sampling, LoRA initialisation, data order and dropout")] = 42
    model: Annotated[ModelParams, param("the base model and its tokenizer")] = field(default_factory=ModelParams)
    quantization: Annotated[QuantizationParams, param("the frozen base in 4 bit")] = field(
        default_factory=QuantizationParams)
    lora: Annotated[LoraParams, param("the adapters")] = field(default_factory=LoraParams)
    data: Annotated[DataParams, param("where the dialogues come from")] = field(default_factory=DataParams)
    prompt: Annotated[PromptParams, param("how a dialogue becomes a prompt")] = field(default_factory=PromptParams)
    training: Annotated[TrainingParams, param("the train stage")] = field(default_factory=TrainingParams)
    eval: Annotated[EvalParams, param("the two evaluation stages")] = field(default_factory=EvalParams)


_VALIDATOR = TypeAdapter(Params)


def parse_params(raw: Any) -> Params:
    """Validate a params mapping (as read from YAML) into typed Params; missing keys take the defaults."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise PipelineError(f"{PARAMS_FILE}: the file must be a mapping of keys, got {raw!r}")
    sections = {name for name, f in fields_of(Params).items() if dataclasses.is_dataclass(f.annotation)}
    raw = {key: {} if key in sections and value is None else value for key, value in raw.items()}  # `model:` alone
    try:
        return _VALIDATOR.validate_python(raw)
    except ValidationError as err:
        raise PipelineError(f"{PARAMS_FILE}: {one_line_error(Params, raw, err)}") from None


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


if __name__ == "__main__":
    reference_cli(Params, "python -m samsum_qlora.params", __doc__.splitlines()[0])
