"""Greedy batched summaries: prompts in length-sorted, left-padded batches, decoded up to the end of the turn.

The evaluate stages, `stages.summarize` and the benchmarks generate through here, so a summary is the same
wherever it is made. The batch plan depends only on the prompts and eval.batch_size: any number of processes
(share_batches) runs the very same batches, and generates the very same tokens, as one process.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedTokenizerBase

from samsum_qlora import distributed
from samsum_qlora.data.prompt import end_of_turn_ids, generation_prompts
from samsum_qlora.evaluation.scoring import ROUGE_KEYS, score_corpus
from samsum_qlora.memory.budget import plan_memory
from samsum_qlora.memory.planning import EvalPlan
from samsum_qlora.model.adapter import load_for_generation
from samsum_qlora.model.loading import choose_device, load_tokenizer
from samsum_qlora.params import Params

log = logging.getLogger(__name__)

# Attention kernels for generation: all of PyTorch's but cuDNN's, which builds an execution plan for every new
# shape (tens of milliseconds) and would do so at every decoding step, as the key/value cache grows by one
# token (benchmarks/profile_generate.py); the memory-efficient kernel takes the padding mask as it is.
GENERATION_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass(frozen=True)
class Generation:
    text: str
    new_tokens: int
    stopped: bool  # ended with an end-of-turn token rather than running out of max_new_tokens
    prompt_shortened: bool = False  # the dialogue was cut at its end to fit prompt.max_length


@dataclass(frozen=True)
class Generator:
    """What the evaluation and `stages.summarize` generate with: the model, its tokenizer, the dialogues' prompts
    (and which were shortened), the stop ids and the memory plan."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    prompts: list[list[int]]
    shortened: list[bool]
    stop_ids: list[int]
    plan: EvalPlan


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
            "shortened_prompts": sum(g.prompt_shortened for g in generations),
            "seconds": round(seconds, 2),
            "examples_per_second": round(len(generations) / seconds, 3) if seconds > 0 else None,
        }
    )
    return per_example, metrics


def dialogue_prompts(params: Params, tokenizer: PreTrainedTokenizerBase,
                     dialogues: list[str]) -> tuple[list[list[int]], list[bool]]:
    """The generation prompts of `dialogues`, each shortened to prompt.max_length tokens as in training, and which
    were: what the evaluation, `stages.summarize` and the export check send."""
    prompt = params.prompt
    prompts, shortened = generation_prompts(tokenizer, prompt.instruction, dialogues, prompt.max_length,
                                            prompt.date_string)
    if any(shortened):
        log.info("%d of %d dialogues are longer than prompt.max_length (%d tokens with the prompt): cut at their end",
                 sum(shortened), len(dialogues), prompt.max_length)
    return prompts, shortened


def model_and_prompts(params: Params, dialogues: list[str], adapter: str | None) -> Generator:
    """The model ready for generation (with `adapter`, if given) and the dialogues' prompts (dialogue_prompts), with
    the memory plan (batch size, dequantize) for eval.max_memory_gib."""
    policy = choose_device(params.quantization)
    log.info("device: %s", policy.reason)
    tokenizer = load_tokenizer(params.model)
    prompts, shortened = dialogue_prompts(params, tokenizer, dialogues)
    plan = plan_memory(params, policy, longest_prompt=max(map(len, prompts), default=1))
    model = load_for_generation(params, policy, adapter, plan)
    return Generator(model, tokenizer, prompts, shortened,
                     stop_token_ids(tokenizer, model, params.prompt.date_string), plan)


def generate_all(params: Params, dialogues: list[str], adapter: str | None) -> list[Generation]:
    """Greedy generations for `dialogues` in this process, in their order."""
    ready = model_and_prompts(params, dialogues, adapter)
    generations = generate(ready.model, ready.tokenizer, ready.prompts, params.eval.max_new_tokens,
                           ready.plan.batch_size, ready.stop_ids)
    return [dataclasses.replace(g, prompt_shortened=cut) for g, cut in zip(generations, ready.shortened, strict=True)]
