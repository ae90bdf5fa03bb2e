"""Export the fine-tuned model as one plain transformers folder: the adapter merged into an unquantized copy of the
base, with the tokenizer, loadable with AutoModelForCausalLM alone (no peft) and by serving engines that read
Hugging Face folders.

    python -m stages.export                          # models/merged/, in the dtype the evaluation computes in
    python -m stages.export --out DIR --dtype float32
    python -m stages.export --base-weights original  # merge into the hub's own weights instead (see below)

Not a stage of `dvc repro`: run it when a model is to be shipped. Which base weights the adapter is merged into:

- `quantized` (the default when quantization.use_4bit): the 4-bit base unpacked to `--dtype`, the weights the
  adapter was trained against and evaluate_adapter measured, so the exported model generates what the ROUGE
  numbers describe (tests/test_use_result.py checks the greedy generations are the adapter's);
- `original`: the base as published, unquantized; its weights differ from those by the 4-bit rounding, so its
  outputs can differ slightly from the evaluated ones.

Then the check: the folder, loaded as a user loads it (AutoModelForCausalLM), regenerates the first
`--check-examples` dialogues of data/predictions/adapter.jsonl. Only a model whose ROUGE-L there is within
`--max-rouge-drift` points of the evaluated one replaces `--out`, with the record in `<out>/export_check.json`;
one that fails is kept at `<out>.rejected/` for inspection, and the command exits with 1. `--no-check` skips it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
from pathlib import Path

import torch

from samsum_qlora.errors import PipelineError, run_stage
from samsum_qlora.evaluation.export_check import check_export, evaluated_rows, file_sha256
from samsum_qlora.files import atomic_dir, drop_code_pointers, write_json
from samsum_qlora.params import Params, load_params
from samsum_qlora.paths import ADAPTER, EXPORT_CHECK, MERGED, PREDICTIONS, REJECTED

log = logging.getLogger(__name__)

DTYPES = ("bfloat16", "float16", "float32")
EVALUATED = PREDICTIONS.format(which="adapter")  # what the export is checked against


def export_dtype(params: Params, name: str) -> torch.dtype:
    """`name`, or for "auto" the dtype the evaluation computes in here: a model saved in another one rounds the
    evaluated weights, and can generate other summaries than those measured."""
    from samsum_qlora.model.loading import choose_device

    return choose_device(params.quantization).compute_dtype if name == "auto" else getattr(torch, name)


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


def export(params: Params, adapter: str, out: str, dtype: torch.dtype, base_weights: str,
           check_rows: list[dict] | None = None, max_rouge_drift: float = 0.5) -> None:
    """Write the merged model and its tokenizer to `out` (atomically: a half-written folder is never left there).
    With `check_rows`, the model must regenerate their evaluated predictions within `max_rouge_drift` ROUGE-L points
    to replace `out`; one that fails is kept beside it (REJECTED) with its EXPORT_CHECK record."""
    from samsum_qlora.model.adapter import check_adapter
    from samsum_qlora.model.loading import load_tokenizer

    check_adapter(adapter)
    tokenizer = load_tokenizer(params.model)
    model = merged_model(params, adapter, dtype, base_weights == "original")
    model.config.use_cache = True
    rejected = Path(REJECTED.format(out=Path(out).as_posix()))
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        drop_code_pointers(tmp, out)
        del model  # the check loads the folder as a user would: one copy of the weights in memory at a time
        if check_rows is not None:
            record = {**check_export(params, tmp, dtype, check_rows, max_rouge_drift), "base_weights": base_weights,
                      "adapter": Path(adapter).as_posix(),
                      "adapter_sha256": file_sha256(Path(adapter) / "adapter_model.safetensors"),
                      "predictions": EVALUATED, "predictions_sha256": file_sha256(EVALUATED)}
            write_json(tmp / EXPORT_CHECK, record)
            if not record["passed"]:
                shutil.rmtree(rejected, ignore_errors=True)
                os.replace(tmp, rejected)  # out of atomic_dir's hands: it removes only what is still at tmp
                raise PipelineError(_failed(record, out, rejected))
    if check_rows is not None and rejected.exists():
        shutil.rmtree(rejected, ignore_errors=True)
        log.info("removed %s, an earlier export that failed its check", rejected.as_posix())
    weights = "the base as published" if base_weights == "original" else (
        "the 4-bit base unpacked" if params.quantization.use_4bit else "the base")
    log.info("merged model (%s, %s) written to %s", weights, str(dtype).removeprefix("torch."), out)


def _failed(record: dict, out: str, rejected: Path) -> str:
    if record["base_weights"] == "original":
        hint = "the base as published differs from the evaluated weights by design: use --base-weights quantized"
    elif record["dtype"] != "float32":
        hint = "try --dtype float32"
    else:
        hint = "if the adapter changed since its evaluation, run `dvc repro evaluate_adapter` first"
    return (f"the merged model failed its check: ROUGE-L {record['rougeL_difference']:+.2f} points from the evaluated "
            f"summaries (limit ±{record['max_rouge_drift']:g}; {record['exact_matches']} of {record['examples']} "
            f"identical); {out} was {'left as it was' if Path(out).exists() else 'not written'} and the rejected "
            f"model is in {rejected.as_posix()}/ (see its "
            f"{EXPORT_CHECK}); {hint}, or accept it with --max-rouge-drift or --no-check")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Merge the adapter into the base and save one transformers folder.")
    parser.add_argument("--adapter", default=ADAPTER, help=f"the adapter folder (default: {ADAPTER})")
    parser.add_argument("--out", default=MERGED, help=f"where to write the merged model (default: {MERGED})")
    parser.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                        help="dtype of the saved weights (default auto: the dtype the evaluation computes in on this "
                             "machine, bfloat16 on a GPU with the default params, float32 on a CPU)")
    parser.add_argument("--base-weights", default="quantized", choices=("quantized", "original"),
                        help="merge into the 4-bit base unpacked (what was trained and evaluated; default) or into "
                             "the base as published")
    parser.add_argument("--check-examples", type=int, default=64, metavar="N",
                        help=f"regenerate the first N dialogues of {EVALUATED} with the merged model (default: 64)")
    parser.add_argument("--max-rouge-drift", type=float, default=0.5, metavar="POINTS",
                        help="fail when the merged model's ROUGE-L there differs from the evaluated one by more "
                             "(default: 0.5 points)")
    parser.add_argument("--no-check", action="store_true", help="write the merged model without that check")
    args = parser.parse_args(argv)
    params = load_params()
    if args.base_weights == "quantized" and not params.quantization.use_4bit:
        log.info("quantization.use_4bit is false: the base was not quantized, its own weights are used")
    if args.out.rstrip("/") == args.adapter.rstrip("/"):
        raise PipelineError(f"--out {args.out} is the adapter folder; choose another folder for the merged model")
    if args.check_examples < 1 or args.max_rouge_drift < 0:
        raise PipelineError("--check-examples must be at least 1 and --max-rouge-drift at least 0 "
                            "(--no-check skips the check)")
    rows = None
    if args.no_check:
        log.info("--no-check: the merged model is not compared with the evaluated summaries")
    else:
        rows = evaluated_rows(EVALUATED, args.check_examples)  # before the merge, so a missing file fails at once
    export(params, args.adapter, args.out, export_dtype(params, args.dtype), args.base_weights, rows,
           args.max_rouge_drift)


if __name__ == "__main__":
    run_stage(main)
