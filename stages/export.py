"""Export the fine-tuned model as one plain transformers folder: the adapter merged into an unquantized copy of the
base, with the tokenizer, loadable with AutoModelForCausalLM alone (no peft) and by serving engines that read
Hugging Face folders.

    python -m stages.export                          # models/merged/, bf16
    python -m stages.export --out DIR --dtype float32
    python -m stages.export --base-weights original  # merge into the hub's own weights instead (see below)

Not a stage of `dvc repro`: run it when a model is to be shipped. Which base weights the adapter is merged into:

- `quantized` (the default when quantization.use_4bit): the 4-bit base unpacked to `--dtype`, the weights the
  adapter was trained against and evaluate_adapter measured, so the exported model generates what the ROUGE
  numbers describe (tests/test_use_result.py checks the greedy generations are the adapter's);
- `original`: the base as published, unquantized; its weights differ from those by the 4-bit rounding, so its
  outputs can differ slightly from the evaluated ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging

import torch

from samsum_qlora.errors import PipelineError, run_stage
from samsum_qlora.files import atomic_dir, drop_code_pointers
from samsum_qlora.params import Params, load_params
from samsum_qlora.paths import ADAPTER, MERGED

log = logging.getLogger(__name__)

DTYPES = ("bfloat16", "float16", "float32")


def merged_model(params: Params, adapter: str, dtype: torch.dtype, original: bool) -> torch.nn.Module:
    """The base (unpacked from 4 bits, or as published) with the adapter merged in, in `dtype`, on the CPU: the
    evaluation's loading path (load_for_generation, with eval.dequantize on)."""
    from samsum_qlora.model.adapter import load_for_generation
    from samsum_qlora.model.loading import DevicePolicy

    quantization = dataclasses.replace(params.quantization, use_4bit=False) if original else params.quantization
    params = dataclasses.replace(params, quantization=quantization,
                                 eval=dataclasses.replace(params.eval, dequantize=True))
    # Loaded on the CPU: exporting needs memory for one copy of the weights, not a GPU. bitsandbytes unpacks NF4 on
    # the CPU to the same values as on a GPU (tests/test_train.py compares its paths).
    model = load_for_generation(params, DevicePolicy("cpu", dtype, "adamw_torch", False, "export"), adapter)
    if hasattr(model, "merge_and_unload"):  # an unquantized base keeps the adapter apart when generating
        model = model.merge_and_unload()
    return model.to(dtype)


def export(params: Params, adapter: str, out: str, dtype: torch.dtype, original: bool) -> None:
    """Write the merged model and its tokenizer to `out` (atomically: a half-written folder is never left there)."""
    from samsum_qlora.model.adapter import check_adapter
    from samsum_qlora.model.loading import load_tokenizer

    check_adapter(adapter)
    tokenizer = load_tokenizer(params.model)
    model = merged_model(params, adapter, dtype, original)
    model.config.use_cache = True
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        drop_code_pointers(tmp, out)
    weights = "the base as published" if original else (
        "the 4-bit base unpacked" if params.quantization.use_4bit else "the base")
    log.info("merged model (%s, %s) written to %s", weights, str(dtype).removeprefix("torch."), out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Merge the adapter into the base and save one transformers folder.")
    parser.add_argument("--adapter", default=ADAPTER, help=f"the adapter folder (default: {ADAPTER})")
    parser.add_argument("--out", default=MERGED, help=f"where to write the merged model (default: {MERGED})")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="dtype of the saved weights")
    parser.add_argument("--base-weights", default="quantized", choices=("quantized", "original"),
                        help="merge into the 4-bit base unpacked (what was trained and evaluated; default) or into "
                             "the base as published")
    args = parser.parse_args(argv)
    params = load_params()
    if args.base_weights == "quantized" and not params.quantization.use_4bit:
        log.info("quantization.use_4bit is false: the base was not quantized, its own weights are used")
    if args.out.rstrip("/") == args.adapter.rstrip("/"):
        raise PipelineError(f"--out {args.out} is the adapter folder; choose another folder for the merged model")
    export(params, args.adapter, args.out, getattr(torch, args.dtype), args.base_weights == "original")


if __name__ == "__main__":
    run_stage(main)
