"""Where the evaluate stage's generation spends its time: batch sizes, prefill vs decoding, and the operators.

    python -m benchmarks.profile_generate [--batch-sizes 128,256,512,819] [--max-new-tokens 48] [--static]
                                          [--tiny] [--out benchmarks/results] [--model-dir DIR] [--label L]

On the random Llama-3.2-1B-shaped model (benchmarks/harness/shapes.py) loaded as the evaluate stage loads it
(4-bit NF4 base unpacked to bf16, samsum_qlora.model.adapter.load_for_generation) and SAMSum-length prompts
(benchmarks/harness/lengths.py), every prompt gets exactly --max-new-tokens tokens (the stop id is outside the
vocabulary), so every setup does the same work:

- for each batch size: samsum_qlora.evaluation.generation.generate over every prompt, timed twice: with one new
  token (the prefill alone) and with --max-new-tokens; the difference over the decoding steps is the time of one
  step;
- a torch.profiler trace of one batch of the first batch size, with the stage's attention kernels
  (samsum_qlora.evaluation.generation.GENERATION_ATTENTION): the operators with the most GPU and CPU time,
  and how busy the GPU was (a GPU far less busy than the wall time means the host bounds the decoding);
- with --static: transformers' static key/value cache (which compiles the decoding step), first call
  (compiling included) and second call on the same batch.

Prints a table and writes profile-generate-<device>-<date>[-label].json (device, versions, git commit).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import sdpa_kernel
from transformers import AutoConfig, GenerationConfig

from benchmarks.bench_eval import TEST_EXAMPLES, project_params
from benchmarks.harness import report
from benchmarks.harness.lengths import examples_for, prompts_of
from benchmarks.harness.shapes import benchmark_model
from samsum_qlora.evaluation.generation import GENERATION_ATTENTION, generate, left_padded
from samsum_qlora.model.adapter import load_for_generation
from samsum_qlora.model.loading import choose_device, load_tokenizer

log = logging.getLogger(__name__)


def timed(fn) -> tuple[Any, float]:
    report.synchronize()
    started = time.perf_counter()
    out = fn()
    report.synchronize()
    return out, time.perf_counter() - started


def batch_sizes_row(model, tokenizer, prompts, batch: int, new_tokens: int, never: int) -> dict[str, Any]:
    """Prefill-only and full generation of every prompt at one batch size."""
    report.reset_memory()
    _, prefill = timed(lambda: generate(model, tokenizer, prompts, 1, batch, [never]))
    report.reset_memory()
    _, full = timed(lambda: generate(model, tokenizer, prompts, new_tokens, batch, [never]))
    batches = -(-len(prompts) // batch)
    steps = batches * (new_tokens - 1)
    return {
        "batch_size": batch, "batches": batches, "new_tokens": new_tokens,
        "prefill_s": round(prefill, 3), "generate_s": round(full, 3),
        "decode_step_ms": round(1000 * (full - prefill) / steps, 2),
        "peak_memory_gib": round(report.peak_memory_gib(), 3),
    }


def profile_batch(model, ids, mask, config) -> dict[str, Any]:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with (torch.inference_mode(), sdpa_kernel(GENERATION_ATTENTION),
          torch.profiler.profile(activities=activities) as profiler):
        _, wall = timed(lambda: model.generate(input_ids=ids, attention_mask=mask, generation_config=config))
    events = profiler.key_averages()
    key = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(events.table(sort_by=key, row_limit=15, max_name_column_width=70))
    print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=70))
    busy = report.gpu_busy_s(events)
    return {
        "wall_s": round(wall, 3),
        "gpu_busy_s": round(busy, 3) if busy is not None else None,
        "top_ops": report.top_ops(events, key),
    }


def static_rows(model, ids, mask, base: GenerationConfig) -> dict[str, Any]:
    config = GenerationConfig(**{**base.to_diff_dict(), "cache_implementation": "static"})
    out: dict[str, Any] = {}
    try:
        def run() -> Any:
            return model.generate(input_ids=ids, attention_mask=mask, generation_config=config)

        with torch.inference_mode(), sdpa_kernel(GENERATION_ATTENTION):
            _, out["first_s"] = timed(run)
            _, out["second_s"] = timed(run)
    except Exception as err:  # a probe: say what failed rather than stop the other numbers
        out["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="128,256,512,819")
    parser.add_argument("--examples", type=int, default=None, help=f"prompts (default {TEST_EXAMPLES}; tiny 32)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default 48; tiny 4")
    parser.add_argument("--static", action="store_true", help="also time the static cache (compiled decoding)")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", type=Path, default=report.RESULTS)
    parser.add_argument("--model-dir", type=Path, default=None, help="where the random model is built (reused)")
    parser.add_argument("--tokenizer", type=Path, default=None, help="default: offline/tiny-llama")
    parser.add_argument("--label", default=None)
    args = parser.parse_args(argv)
    examples = args.examples or (32 if args.tiny else TEST_EXAMPLES)
    new_tokens = args.max_new_tokens or (4 if args.tiny else 48)
    sizes = [int(b) for b in args.batch_sizes.split(",")]

    model_dir = benchmark_model(args.tiny, args.model_dir, args.tokenizer)
    params = project_params(model_dir, None)
    tokenizer = load_tokenizer(params.model)
    prompts = prompts_of(examples_for(tokenizer, examples, seed=1))
    never = AutoConfig.from_pretrained(str(model_dir)).vocab_size
    policy = choose_device(params.quantization)
    (model, load_s) = timed(lambda: load_for_generation(params, policy, adapter=None))
    out = report.header("profile-generate", {
        "examples": examples, "max_new_tokens": new_tokens, "tiny": args.tiny, "device_policy": policy.reason,
        "prompt_length_mean": round(statistics.fmean(map(len, prompts)), 1),
        "prompt_length_max": max(map(len, prompts)),
        "load_s": round(load_s, 3),
    })
    rows = [batch_sizes_row(model, tokenizer, prompts, b, new_tokens, never) for b in sizes]
    print(report.table([("batch", "batch_size"), ("batches", "batches"), ("prefill s", "prefill_s"),
                        ("generate s", "generate_s"), ("ms/decode step", "decode_step_ms"),
                        ("peak GiB", "peak_memory_gib")], rows))
    results: dict[str, Any] = {"batch_sizes": rows}
    out["results"] = results
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))[: sizes[0]]
    ids, mask = left_padded([prompts[i] for i in order], tokenizer.pad_token_id, next(model.parameters()).device)
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=[never],
                              pad_token_id=tokenizer.pad_token_id)
    results["profile"] = profiled = {"batch_size": len(order), **profile_batch(model, ids, mask, config)}
    print(f"profiled batch of {len(order)}: wall {profiled['wall_s']} s, GPU busy {profiled['gpu_busy_s']} s")
    if args.static:
        results["static_cache"] = {"batch_size": len(order), **static_rows(model, ids, mask, config)}
        print("static cache:", results["static_cache"])
    path = report.write_results(out, args.out, args.tiny, args.label)
    print(f"written to {path}")
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    main()
