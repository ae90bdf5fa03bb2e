"""Stages evaluate_baseline and evaluate_adapter: greedy summaries of the test split, scored with ROUGE.

    python -m stages.evaluate baseline   (or: dvc repro evaluate_baseline)
    python -m stages.evaluate adapter    (or: dvc repro evaluate_adapter)

The baseline is the untuned base model asked zero-shot with the same prompt; the adapter run loads
models/adapter/ on top of the same base. Writes metrics/<which>.json and data/predictions/<which>.jsonl.
With training.num_processes = N > 1 the generation runs in N processes (one per GPU, samsum_qlora/distributed.py), each
taking whole batches of the one-process plan, so the predictions are the same bytes as one process writes.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedTokenizerBase

from samsum_qlora import distributed
from samsum_qlora.data.prompt import end_of_turn_ids, generation_prompt_ids
from samsum_qlora.errors import PipelineError, run_stage
from samsum_qlora.evaluation.scoring import ROUGE_KEYS, score_corpus
from samsum_qlora.files import read_jsonl, write_json, write_jsonl
from samsum_qlora.memory.budget import plan_memory
from samsum_qlora.memory.planning import EvalPlan
from samsum_qlora.model.loading import DevicePolicy, choose_device, load_base_model, load_tokenizer
from samsum_qlora.params import Params, load_params

log = logging.getLogger(__name__)

TEST = "data/prepared/test.jsonl"
ADAPTER = "models/adapter"
METRICS = "metrics/{which}.json"
PREDICTIONS = "data/predictions/{which}.jsonl"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # safetensors only: never a pickle
# Attention kernels for generation: all of PyTorch's but cuDNN's, which builds an execution plan for every new
# shape (tens of milliseconds) and would do so at every decoding step, as the key/value cache grows by one
# token (benchmarks/profile_generate.py); the memory-efficient kernel takes the padding mask as it is.
GENERATION_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


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


def plan_batches(prompts: list[list[int]], batch_size: int) -> list[list[int]]:
    """Prompt indices in batches of `batch_size`, longest first: similar lengths waste little padding, and an
    out-of-memory error shows up at once. The plan depends on nothing else, so any number of processes runs the
    very same batches (and generates the very same tokens) as one process."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def share_batches(batches: list[list[int]], prompts: list[list[int]], max_new_tokens: int, rank: int,
                  processes: int) -> list[list[int]]:
    """The batches process `rank` of `processes` generates: whole batches, each (longest first) to the process
    with the least work so far, work counted as rows x (padded prompt + new tokens)."""
    work, mine = [0] * processes, []
    for batch in batches:
        process = min(range(processes), key=lambda p: (work[p], p))
        work[process] += len(batch) * (max(len(prompts[i]) for i in batch) + max_new_tokens)
        if process == rank:
            mine.append(batch)
    return mine


def left_padded(prompts: list[list[int]], pad_id: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts as one batch padded on the left to the longest, and its attention mask, on `device`."""
    width = max(map(len, prompts))
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.as_tensor(prompt)
        attention_mask[row, width - len(prompt) :] = 1
    return input_ids.to(device), attention_mask.to(device)


@torch.inference_mode()
def generate_batches(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    batches: list[list[int]],
    max_new_tokens: int,
    stop_ids: list[int],
) -> dict[int, Generation]:
    """Greedy generation of the given batches of prompt indices, left-padded, with GENERATION_ATTENTION; decodes
    only the new tokens."""
    device = next(model.parameters()).device
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id
    )
    results: dict[int, Generation] = {}
    with (tqdm(total=sum(map(len, batches)), desc="generate", unit="ex", disable=not distributed.is_main()) as bar,
          sdpa_kernel(GENERATION_ATTENTION)):
        for batch in batches:
            input_ids, attention_mask = left_padded([prompts[i] for i in batch], tokenizer.pad_token_id, device)
            width = input_ids.shape[1]
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
            for row, i in enumerate(batch):
                results[i] = _decode(tokenizer, out[row, width:].tolist(), stop_ids)
            bar.update(len(batch))
    return results


def generate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    max_new_tokens: int,
    batch_size: int,
    stop_ids: list[int],
) -> list[Generation]:
    """Greedy generation for every prompt, in length-sorted batches (plan_batches), in prompt order."""
    results = generate_batches(model, tokenizer, prompts, plan_batches(prompts, batch_size), max_new_tokens, stop_ids)
    return [results[i] for i in range(len(prompts))]


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


def evaluate(which: str, parts: str | None = None) -> None:
    """The stage: generate for the test split (in this process, or in training.num_processes processes that each
    write their share to a folder of parts), then score and write the outputs here."""
    params = load_params()
    rows = read_jsonl(TEST)
    if params.eval.max_samples:
        rows = rows[: params.eval.max_samples]
    if not rows:
        raise PipelineError(f"{TEST} has no rows: re-run `dvc repro prepare`")
    if which == "adapter":
        check_adapter()
    processes = distributed.local_processes(params.training.num_processes)
    if distributed.in_worker():
        if parts is None:
            raise PipelineError("a worker of several evaluation processes needs --parts (it is started by the stage)")
        generate_share(which, params, rows, Path(parts))
        return
    started = time.perf_counter()
    if processes > 1:
        generations = generate_in_processes(which, processes, len(rows))
    else:
        generations = generate_all(params, [r["dialogue"] for r in rows], _adapter_of(which))
    seconds = time.perf_counter() - started
    per_example, metrics = summarize_generations(generations, [r["summary"] for r in rows], seconds)
    metrics["processes"] = processes

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


def model_and_prompts(params: Params, dialogues: list[str], adapter: str | None) -> tuple:
    """The model ready for generation (with `adapter`, if given), its tokenizer, the dialogues' prompts, the stop ids
    and the memory plan (batch size, dequantize) for eval.max_memory_gib: what the evaluation and `stages.summarize`
    generate with."""
    policy = choose_device(params.quantization)
    log.info("device: %s", policy.reason)
    tokenizer = load_tokenizer(params.model)
    prompts = [generation_prompt_ids(tokenizer, params.prompt.instruction, d, params.prompt.date_string)
               for d in dialogues]
    plan = plan_memory(params, policy, longest_prompt=max(map(len, prompts), default=1))
    model = load_for_generation(params, policy, adapter, plan)
    return model, tokenizer, prompts, stop_token_ids(tokenizer, model, params.prompt.date_string), plan


def generate_all(params: Params, dialogues: list[str], adapter: str | None) -> list[Generation]:
    """Greedy generations for `dialogues` in this process, in their order."""
    model, tokenizer, prompts, stops, planned = model_and_prompts(params, dialogues, adapter)
    return generate(model, tokenizer, prompts, params.eval.max_new_tokens, planned.batch_size, stops)


def _adapter_of(which: str) -> str | None:
    return ADAPTER if which == "adapter" else None


def generate_share(which: str, params: Params, rows: list[dict], parts: Path) -> None:
    """One worker's share: its batches of the one-process plan, written to parts/<rank>.jsonl."""
    distributed.quiet_replicas()
    model, tokenizer, prompts, stops, planned = model_and_prompts(params, [r["dialogue"] for r in rows],
                                                                  _adapter_of(which))
    mine = share_batches(plan_batches(prompts, planned.batch_size), prompts, params.eval.max_new_tokens,
                         distributed.rank(), distributed.world_size())
    results = generate_batches(model, tokenizer, prompts, mine, params.eval.max_new_tokens, stops)
    write_jsonl(parts / f"{distributed.rank()}.jsonl",
                ({"index": i, "text": g.text, "new_tokens": g.new_tokens, "stopped": g.stopped}
                 for i, g in sorted(results.items())))


def generate_in_processes(which: str, processes: int, count: int) -> list[Generation]:
    """Generate in `processes` processes (one per GPU), each a share of the batches; their parts merged in order."""
    distributed.check_devices(processes)
    folder = Path(PREDICTIONS.format(which=which)).parent
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=f".{which}-parts-") as parts:
        distributed.launch("stages.evaluate", [which, "--parts", parts], processes, f"evaluation ({which})",
                      this_machine=True)
        results: dict[int, Generation] = {}
        for part in sorted(Path(parts).glob("*.jsonl")):
            for record in read_jsonl(part):
                results[record["index"]] = Generation(record["text"], record["new_tokens"], record["stopped"])
    if sorted(results) != list(range(count)):  # every process ended well, so this is a bug, not bad input
        raise RuntimeError(f"the evaluation processes returned {len(results)} of {count} predictions")
    return [results[i] for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description="Evaluate the base model or the fine-tuned adapter with ROUGE.")
    parser.add_argument("which", choices=["baseline", "adapter"])
    parser.add_argument("--parts", help=argparse.SUPPRESS)  # set by the stage for its worker processes
    args = parser.parse_args()
    evaluate(args.which, args.parts)


if __name__ == "__main__":
    run_stage(main)
