"""The params.yaml schema: every key's type, range, default and meaning, validated once when a stage starts.

    python -m samsum_qlora.params --markdown > docs/params.md   # the reference page, generated from this schema
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BeforeValidator, ConfigDict, Field, Strict, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass
from pydantic_core import PydanticUndefined

from samsum_qlora.errors import PipelineError
from samsum_qlora.params_text import one_line_error, reference_markdown
from samsum_qlora.paths import PARAMS

PARAMS_FILE = PARAMS
SCHEMA = ConfigDict(extra="forbid")


def _yaml_number(value: Any) -> Any:
    """YAML 1.1 reads "2e-4" as a string: a number written so still counts as one."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _one_or_many(value: Any) -> Any:
    return [value] if isinstance(value, str) else value  # a single name given on the CLI: -S lora.target_modules=q_proj


# YAML's types, strictly: "8" is not an integer, 2.5 is not one either, "yes" is not true; an integer is a number.
Int = Annotated[int, Strict()]
Number = Annotated[float, BeforeValidator(_yaml_number), Strict()]
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]
Name = Annotated[str, Strict(), Field(min_length=1)]


def param(default: Any = PydanticUndefined, about: str = "", *, means: str | None = None, noun: str | None = None,
          unit: str | None = None, note: str | None = None, **constraints: Any) -> Any:
    """A field of the schema: its default, what it does (`about`), and how its accepted values read in words:
    `means` says what null (or the one special value) does, `noun`/`unit`/`note` complete the range's wording."""
    words = {k: v for k, v in {"means": means, "noun": noun, "unit": unit, "note": note}.items() if v}
    return Field(default, description=about, json_schema_extra=words or None, **constraints)


@dataclass(frozen=True, config=SCHEMA)
class ModelParams:
    base_model: Str = param("meta-llama/Llama-3.2-1B-Instruct", "hub id or local directory of the base chat model "
                            "(Llama 3.2 is gated: it needs a Hugging Face token)",
                            noun="a hub model id or a local directory", min_length=1)
    tokenizer_type: Str | None = param("meta-llama/Llama-3.2-1B-Instruct", "hub id or local directory of the "
                                       "tokenizer (with a chat template); null = the same as base_model")
    revision: Str = param("main", "hub branch, tag or commit of model and tokenizer; pin a commit to reproduce "
                          "exactly", noun="a branch, tag or commit", min_length=1)

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer_type or self.base_model


@dataclass(frozen=True, config=SCHEMA)
class QuantizationParams:
    use_4bit: Bool = param(True, "load the frozen base in 4 bit (QLoRA); false = plain LoRA on an unquantized base")
    bnb_4bit_compute_dtype: Literal["bfloat16", "float16", "float32"] = param(
        "bfloat16", "dtype of the 4-bit matmuls; on CPU float32 is used (said in the log)")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = param("nf4", "4-bit data type of the base's weights")
    bnb_4bit_use_double_quant: Bool = param(True, "also quantize the quantization constants (saves ~0.4 bit/param)")


@dataclass(frozen=True, config=SCHEMA)
class LoraParams:
    r: Int = param(8, "rank of the update matrices", gt=0)
    lora_alpha: Int = param(16, "scaling numerator: the update is scaled by lora_alpha / r", gt=0)
    target_modules: Annotated[list[Name], BeforeValidator(_one_or_many)] = param(
        about="names of the linear layers that get adapters", noun="module names, e.g. [q_proj, v_proj]",
        default_factory=lambda: ["q_proj", "v_proj"], min_length=1)
    lora_dropout: Number = param(0.05, "dropout on the adapter input", ge=0, lt=1)


@dataclass(frozen=True, config=SCHEMA)
class DataParams:
    source: Str = param("knkarthick/samsum", "hub dataset id, or a local file/folder (json, jsonl, csv, parquet; "
                        "README, Data sources)", noun="a hub dataset id or a local path", min_length=1)
    revision: Str = param("main", "hub branch, tag or commit of the dataset (ignored for local files)")
    dialogue_column: Str = param("dialogue", "column holding the conversation", noun="a column name", min_length=1)
    summary_column: Str = param("summary", "column holding the reference summary", noun="a column name",
                                min_length=1)
    id_column: Str = param("id", "column holding a row id; optional in the data: a stable id is derived from the "
                           "text when absent", noun="a column name", min_length=1)
    train_samples: Int | None = param(None, "rows of the train split: a seeded sample of N rows", means="all rows",
                                      gt=0)
    validation_samples: Int | None = param(None, "rows of the validation split, as train_samples",
                                           means="all rows", gt=0)
    test_samples: Int | None = param(None, "rows of the test split, as train_samples", means="all rows", gt=0)


@dataclass(frozen=True, config=SCHEMA)
class PromptParams:
    instruction: Str = param("Summarize this dialogue in one or two sentences.",
                             "the user turn, followed by the dialogue")
    max_length: Int = param(512, "tokens per training example; long dialogues are shortened, never the summary",
                            note="tokens", ge=16)
    date_string: Str = param("26 Jul 2024", "fixed date for chat templates that print today's date (Llama 3.x)")


@dataclass(frozen=True, config=SCHEMA)
class TrainingParams:
    num_train_epochs: Number = param(1.0, "passes over the training split", gt=0)
    max_steps: Literal[-1] | Annotated[Int, Field(gt=0)] = param(
        -1, "> 0 stops after this many optimizer steps instead (quick runs)", means="use num_train_epochs")
    per_device_train_batch_size: Int = param(16, "sequences per process and micro-batch; sequences per optimizer "
                                             "step = this x gradient_accumulation_steps x num_processes", gt=0)
    gradient_accumulation_steps: Int = param(1, "micro-batches per optimizer step (16 x 1 gives the tutorial's "
                                             "4 x 4 loss, in one pass)", gt=0)
    num_processes: Int = param(1, "data-parallel processes, one per GPU, for training and both evaluations; the "
                               "train batch size must divide by it (README, Several GPUs)",
                               note="data-parallel processes: one per GPU", gt=0)
    max_tokens_per_micro_batch: Int | None = param(
        8192, "a micro-batch of more tokens (padded: rows x longest row) runs as several forward/backward passes "
        "cut between examples: the same loss and gradients, less memory, slower (README, Performance)",
        means="one pass per micro-batch", note="tokens", gt=0)
    learning_rate: Number = param(2e-4, "peak learning rate", gt=0)
    lr_scheduler_type: Str = param("linear", "any transformers scheduler name: linear | cosine | "
                                   "constant_with_warmup | ...")
    warmup_steps: Int = param(50, "optimizer steps of linear warmup", ge=0)
    weight_decay: Number = param(0.0, "AdamW weight decay", ge=0)
    max_grad_norm: Number = param(1.0, "gradient clipping norm", note="0 disables clipping", ge=0)
    logging_steps: Int = param(10, "train loss is logged (and plotted) every N optimizer steps", gt=0)
    save_strategy: Literal["steps", "epoch", "no"] = param("steps", "when checkpoints are written")
    save_steps: Int = param(100, "checkpoint into models/checkpoints/ every N steps (resume after interruption)",
                            gt=0)
    save_total_limit: Int = param(2, "checkpoints kept on disk", gt=0)
    eval_steps: Int = param(100, "validation loss every N steps", gt=0)
    per_device_eval_batch_size: Int = param(8, "validation examples per pass when max_tokens_per_micro_batch is "
                                            "null; with a cap, a pass takes whole examples up to it", gt=0)
    optim: Str = param("paged_adamw_8bit", "any transformers optimizer; on CPU adamw_torch is used instead (said "
                       "in the log)")
    padding_free: Bool = param(True, "lay a micro-batch's examples end to end, each attending only to itself; "
                               "false = pad to the longest example, as the tutorial did")
    dequantize: Bool = param(True, "train over the NF4 base unpacked once to the compute dtype: the same weights, "
                             "faster, 2 bytes/weight instead of ~0.6; false = the 4-bit kernels")
    compile: Bool = param(True, "torch.compile the decoder layers (CUDA only): ~1.5x faster, less activation "
                          "memory, 20-30 s of compiling; false = eager")
    gradient_checkpointing: Bool = param(False, "recompute activations in the backward pass: ~half the memory, "
                                         "~1.8x slower")
    upcast_frozen: Bool = param(False, "frozen embeddings and norms in float32 (peft's "
                                "prepare_model_for_kbit_training): slower, and more memory")
    max_memory_gib: Number | None = param(
        None, "GPU memory the stage may use; when the switches above would not fit, the stage picks the fastest "
        "settings that do and says so (README, Performance)", means="the GPU's memory", unit="GiB", note="e.g. 16",
        gt=1)


@dataclass(frozen=True, config=SCHEMA)
class EvalParams:
    max_new_tokens: Int = param(64, "generation budget per summary (SAMSum summaries are ~25 tokens)", gt=0)
    batch_size: Int = param(256, "dialogues generated together (sorted by length, left-padded)", gt=0)
    max_samples: Int | None = param(None, "rows of the test split to evaluate: its first N (quick runs)",
                                    means="the whole test split", gt=0)
    dequantize: Bool = param(True, "generate with the 4-bit base unpacked to the compute dtype and the adapter "
                             "merged in: the same weights, several times faster; false = 4-bit kernels")
    max_memory_gib: Number | None = param(
        None, "GPU memory for generation; the 4-bit base and smaller batches are used when the settings above "
        "would not fit", means="the GPU's memory", unit="GiB", note="e.g. 16", gt=1)


@dataclass(frozen=True, config=SCHEMA)
class Params:
    seed: Int = param(42, "seeds sampling, LoRA initialisation, data order and dropout")
    model: ModelParams = param(default_factory=ModelParams, about="the base model and its tokenizer")
    quantization: QuantizationParams = param(default_factory=QuantizationParams, about="the frozen base in 4 bit")
    lora: LoraParams = param(default_factory=LoraParams, about="the adapters")
    data: DataParams = param(default_factory=DataParams, about="where the dialogues come from")
    prompt: PromptParams = param(default_factory=PromptParams, about="how a dialogue becomes a prompt")
    training: TrainingParams = param(default_factory=TrainingParams, about="the train stage")
    eval: EvalParams = param(default_factory=EvalParams, about="the two evaluation stages")


_VALIDATOR = TypeAdapter(Params)


def parse_params(raw: Any) -> Params:
    """Validate a params mapping (as read from YAML) into typed Params; missing keys take the defaults."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise PipelineError(f"{PARAMS_FILE}: the file must be a mapping of keys, got {raw!r}")
    sections = {name for name, f in Params.__pydantic_fields__.items() if dataclasses.is_dataclass(f.annotation)}
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
    parser = argparse.ArgumentParser(prog="python -m samsum_qlora.params", description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print docs/params.md, the params reference")
    if parser.parse_args().markdown:
        print(reference_markdown(Params), end="")
    else:
        parser.print_help()
