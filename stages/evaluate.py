"""Stages evaluate_baseline and evaluate_adapter: greedy summaries of the test split, scored with ROUGE.

    python -m stages.evaluate baseline   (or: dvc repro evaluate_baseline)
    python -m stages.evaluate adapter    (or: dvc repro evaluate_adapter)

The baseline is the untuned base model asked zero-shot with the same prompt; the adapter run loads
models/adapter/ on top of the same base. Writes metrics/<which>.json and data/predictions/<which>.jsonl.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedTokenizerBase

from stages.errors import PipelineError, run_stage
from stages.files import read_jsonl, write_json, write_jsonl
from stages.modeling import DevicePolicy, choose_device, load_base_model, load_tokenizer
from stages.params import Params, load_params
from stages.prompt import end_of_turn_ids, generation_prompt_ids
from stages.scoring import ROUGE_KEYS, score_corpus

log = logging.getLogger(__name__)

TEST = "data/prepared/test.jsonl"
ADAPTER = "models/adapter"
METRICS = "metrics/{which}.json"
PREDICTIONS = "data/predictions/{which}.jsonl"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # safetensors only: never a pickle


@dataclass(frozen=True)
class Generation:
    text: str
    new_tokens: int
    stopped: bool  # ended with an end-of-turn token rather than running out of max_new_tokens


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, model: torch.nn.Module, date_string: str) -> list[int]:
    """The template's end-of-turn token(s) plus every EOS the model and tokenizer declare."""
    ids = list(end_of_turn_ids(tokenizer, date_string)[:1])
    for source in (getattr(model, "generation_config", None), tokenizer):
        eos = getattr(source, "eos_token_id", None)
        for i in eos if isinstance(eos, list) else [eos]:
            if i is not None and i not in ids:
                ids.append(i)
    return ids


@torch.inference_mode()
def generate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    max_new_tokens: int,
    batch_size: int,
    stop_ids: list[int],
) -> list[Generation]:
    """Greedy generation in length-sorted, left-padded batches; decodes only the new tokens."""
    device = next(model.parameters()).device
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id
    )
    # Longest first: similar lengths waste little padding, and an out-of-memory error shows up at once.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[Generation | None] = [None] * len(prompts)
    with tqdm(total=len(prompts), desc="generate", unit="ex") as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            width = max(len(prompts[i]) for i in batch)
            input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                input_ids[row, width - len(prompts[i]) :] = torch.as_tensor(prompts[i])
                attention_mask[row, width - len(prompts[i]) :] = 1
            out = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=config
            )
            for row, i in enumerate(batch):
                results[i] = _decode(tokenizer, out[row, width:].tolist(), stop_ids)
            bar.update(len(batch))
    return results  # type: ignore[return-value]


def _decode(tokenizer: PreTrainedTokenizerBase, new_ids: list[int], stop_ids: list[int]) -> Generation:
    cut = next((k for k, t in enumerate(new_ids) if t in stop_ids), None)
    kept = new_ids if cut is None else new_ids[:cut]
    return Generation(tokenizer.decode(kept, skip_special_tokens=True).strip(), len(kept), cut is not None)


def check_adapter(path: str = ADAPTER) -> None:
    """Fail before any model is loaded when the adapter folder lacks its config or safetensors weights."""
    missing = [name for name in ADAPTER_FILES if not (Path(path) / name).is_file()]
    if missing:
        raise PipelineError(
            f"{path}/ has no {' or '.join(missing)}: run `dvc repro train` (or `dvc checkout {path}`) first"
        )


def load_adapter(base: torch.nn.Module, path: str = ADAPTER) -> torch.nn.Module:
    from peft import PeftModel

    check_adapter(path)
    try:
        return PeftModel.from_pretrained(base, path)
    except Exception as err:  # peft raises many types for a damaged file
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        raise PipelineError(
            f"{path}/ could not be loaded ({type(err).__name__}: {reason}); "
            f"restore it with `dvc checkout {path}` or re-create it with `dvc repro -f train`"
        ) from None


def summarize_generations(
    generations: list[Generation], references: list[str], seconds: float
) -> tuple[list[dict[str, float]], dict]:
    """Per-example ROUGE and the metrics of one evaluation; empty predictions score 0 and are counted."""
    per_example, means = score_corpus([g.text for g in generations], references)
    metrics: dict = {k: round(means[k], 6) for k in ROUGE_KEYS}
    metrics.update(
        {
            "gen_len_mean": round(sum(g.new_tokens for g in generations) / len(generations), 2),
            "examples": len(generations),
            "empty_predictions": sum(not g.text for g in generations),
            "cut_by_max_new_tokens": sum(not g.stopped for g in generations),
            "seconds": round(seconds, 2),
            "examples_per_second": round(len(generations) / seconds, 3) if seconds > 0 else None,
        }
    )
    return per_example, metrics


def load_for_generation(params: Params, policy: DevicePolicy, adapter: str | None) -> torch.nn.Module:
    """The base model (with the adapter, if given) ready for generation.

    With eval.dequantize, the 4-bit weights are unpacked once to the compute dtype and the adapter is merged
    into them: the weights the adapter was trained against, without a dequantization in every matmul of
    every generated token (the 4-bit kernels' cost at generation time).
    """
    model = load_base_model(params.model, params.quantization, policy)
    unpack = params.eval.dequantize and params.quantization.use_4bit
    if unpack:
        model = model.dequantize(dtype=policy.compute_dtype)
    if adapter:
        model = load_adapter(model, adapter)
        if unpack:
            model = model.merge_and_unload()
    return model.eval()


def evaluate(which: str) -> None:
    params = load_params()
    policy = choose_device(params.quantization)
    log.info("device: %s", policy.reason)
    rows = read_jsonl(TEST)
    if params.eval.max_samples:
        rows = rows[: params.eval.max_samples]
    if not rows:
        raise PipelineError(f"{TEST} has no rows: re-run `dvc repro prepare`")
    if which == "adapter":
        check_adapter()
    tokenizer = load_tokenizer(params.model)
    started = time.perf_counter()
    model = load_for_generation(params, policy, ADAPTER if which == "adapter" else None)
    prompts = [
        generation_prompt_ids(tokenizer, params.prompt.instruction, r["dialogue"], params.prompt.date_string)
        for r in rows
    ]
    stops = stop_token_ids(tokenizer, model, params.prompt.date_string)
    generations = generate(model, tokenizer, prompts, params.eval.max_new_tokens, params.eval.batch_size, stops)
    seconds = time.perf_counter() - started
    per_example, metrics = summarize_generations(generations, [r["summary"] for r in rows], seconds)

    write_jsonl(
        PREDICTIONS.format(which=which),
        (
            {
                "id": r["id"],
                "dialogue": r["dialogue"],
                "reference": r["summary"],
                "prediction": g.text,
                "scores": {k: round(s[k], 6) for k in ROUGE_KEYS},
                "new_tokens": g.new_tokens,
                "stopped": g.stopped,
            }
            for r, g, s in zip(rows, generations, per_example, strict=True)
        ),
    )
    write_json(METRICS.format(which=which), metrics)
    log.info("%s: %s", which, metrics)


def main() -> None:
    parser = argparse.ArgumentParser(description="Evaluate the base model or the fine-tuned adapter with ROUGE.")
    parser.add_argument("which", choices=["baseline", "adapter"])
    evaluate(parser.parse_args().which)


if __name__ == "__main__":
    run_stage(main)
