"""Compile time of the train stage, cold and with torch's compile cache warm, across LoRA ranks.

    python -m benchmarks.bench_compile [--ranks 8,8,16,32] [--variants default,static-rank]
                                       [--steps 2] [--warmup 2] [--tiny] [--out benchmarks/results] [--label L]

Each experiment of a sweep is a fresh process that compiles the decoder layers again; what it costs depends on
what torch's on-disk cache (TORCHINDUCTOR_CACHE_DIR, Triton's cache) already holds. For each variant this
starts from empty caches and runs one fresh process per rank in the order given, each sharing the variant's
caches: the first is cold, the later ones find what the earlier ones compiled. Each process trains the project's
Trainer (bench_train's project setup, benchmarks/harness/setups.py; default params but the rank) for warm-up +
timed steps on the Llama-3.2-1B-shaped model and reports torch's own compile counters: seconds spent compiling
(and in code generation), graphs compiled, cache hits and misses; and the warm-up seconds, which include compiling.

Variants:
- default: samsum_qlora/model/compiling.py as the train stage runs it (rank compiled as a symbol, no CPU vector-ISA test
  builds, compile workers started while the Trainer is built);
- static-rank: the rank compiled as a constant, as torch does by default (each new rank is a new graph);
- late-workers: as default, but compile workers left to start at the first compile;
- isa-probe: as default, but inductor test-builds the CPU's vector instruction sets first, as it does by default.

`--profile` also writes each process's cProfile summary beside the results. Prints a table and writes
compile-<device>-<date>[-label].json (device, versions, git commit, numbers) after every process, so an
interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import logging
import os
import pstats
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import report
from benchmarks.harness.shapes import LLAMA_3_2_1B, TINY, benchmark_model
from samsum_qlora.files import finite_or_none

log = logging.getLogger(__name__)

VARIANTS = ("default", "static-rank", "late-workers", "isa-probe")
RESULT = "BENCH_COMPILE_RESULT "


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One fresh process: train the project's Trainer at one rank; return its compile counters and timings."""
    from transformers import AutoTokenizer

    from benchmarks.harness.lengths import examples_for
    from benchmarks.harness.setups import Bench, measure
    from samsum_qlora.model import compiling

    if spec["variant"] == "static-rank":
        compiling.compile_rank_as_symbol = lambda layers: None
    elif spec["variant"] == "late-workers":
        compiling.start_compile_workers = lambda: None
    elif spec["variant"] == "isa-probe":
        compiling.skip_cpu_isa_probe = lambda: None
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"], trust_remote_code=False)
    examples = examples_for(tokenizer, (spec["warmup"] + spec["steps"]) * 16, seed=0)
    profiler = cProfile.Profile() if spec.get("profile") else None
    with tempfile.TemporaryDirectory(prefix="bench-compile-") as scratch:
        bench = Bench(Path(spec["model_dir"]), examples, spec["steps"], spec["warmup"], Path(scratch),
                      {"lora": {"r": spec["rank"]}})
        if profiler:
            profiler.enable()
        result = measure("project", bench, tokenizer.pad_token_id)
        if profiler:
            profiler.disable()
            write_profile(profiler, Path(spec["profile"]))
    from torch._dynamo.utils import calculate_time_spent, counters

    spent = calculate_time_spent()
    inductor, aot = counters.get("inductor", {}), counters.get("aot_autograd", {})
    return {
        "warmup_seconds": result["warmup_seconds"],
        "tokens_per_second": result["tokens_per_second"],
        "compile_seconds": round(spent.get("total_wall_time", 0.0), 2),
        "compile_breakdown": {key: round(value, 2) for key, value in spent.items()},
        "code_gen_seconds": round(spent.get("code_gen", 0.0), 2),
        "graphs": counters.get("stats", {}).get("unique_graphs", 0),
        "fx_graph_cache": {"hit": inductor.get("fxgraph_cache_hit", 0), "miss": inductor.get("fxgraph_cache_miss", 0)},
        "autograd_cache": {"hit": aot.get("autograd_cache_hit", 0), "miss": aot.get("autograd_cache_miss", 0)},
        "compile_threads": getattr(torch._inductor.config, "compile_threads", None),
        "peak_memory_gib": result["peak_memory_gib"],
        "final_loss": result["final_loss"],
    }


def write_profile(profiler: cProfile.Profile, path: Path) -> None:
    """The functions that took longest, with and without what they called, as text."""
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("cumulative").print_stats(60)
    stats.sort_stats("tottime").print_stats(40)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.getvalue(), encoding="utf-8")


def run_child(spec: dict[str, Any], cache: Path) -> dict[str, Any]:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"), "TRITON_CACHE_DIR": str(cache / "triton")}
    started = time.perf_counter()
    child_spec = json.dumps(spec, allow_nan=False)
    done = subprocess.run([sys.executable, "-m", "benchmarks.bench_compile", "--child", child_spec],
                          env=env, capture_output=True, text=True)
    seconds = round(time.perf_counter() - started, 2)
    line = next((ln for ln in reversed(done.stdout.splitlines()) if ln.startswith(RESULT)), None)
    if done.returncode != 0 or line is None:
        sys.stderr.write(done.stderr[-4000:])
        return {"error": f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:] or ['no output']}",
                "process_seconds": seconds}
    return {"process_seconds": seconds, **json.loads(line.removeprefix(RESULT))}


def run(ranks: list[int], variants: list[str], steps: int, warmup: int, tiny: bool, out_dir: str | Path,
        label: str | None, profile: bool = False) -> tuple[dict[str, Any], Path]:
    model_dir = benchmark_model(tiny)
    out = report.header("compile", {"ranks": ranks, "variants": variants, "steps": steps, "warmup_steps": warmup,
                                    "tiny": tiny, "model_shape": asdict(TINY if tiny else LLAMA_3_2_1B),
                                    "label": label})
    out["results"] = []
    with tempfile.TemporaryDirectory(prefix="bench-compile-caches-") as caches:
        for variant in variants:
            cache = Path(caches) / variant  # empty for the variant's first process
            for i, rank in enumerate(ranks):
                log.info("%s: r %d (%s cache)", variant, rank, "warm" if i else "cold")
                spec = {"variant": variant, "rank": rank, "model_dir": str(model_dir), "steps": steps,
                        "warmup": warmup}
                if profile:
                    spec["profile"] = str(Path(out_dir) / f"compile-profile-{variant}-r{rank}-{i}.txt")
                row = {"variant": variant, "rank": rank, "cache": "warm" if i else "cold", **run_child(spec, cache)}
                out["results"].append(row)
                path = report.write_results(out, out_dir, tiny, label)
    return out, path


def print_report(out: dict[str, Any], path: Path) -> None:
    columns = [("variant", "variant"), ("r", "rank"), ("cache", "cache"), ("process s", "process_seconds"),
               ("warm-up s", "warmup_seconds"), ("compile s", "compile_seconds"), ("codegen s", "code_gen_seconds"),
               ("graphs", "graphs"), ("fx hit/miss", "fx_hits"), ("tokens/s", "tokens_per_second"),
               ("error", "error")]
    rows = [dict(r, fx_hits=f"{r['fx_graph_cache']['hit']}/{r['fx_graph_cache']['miss']}" if "fx_graph_cache" in r
                 else None) for r in out["results"]]
    print(f"\n{out['device']}: {out['config']['warmup_steps']} warm-up + {out['config']['steps']} timed steps per "
          f"process\n" + report.table(columns, rows) + f"\nwritten to {path}")


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", default="8,8,16,32", help="LoRA ranks, one fresh process each, in this order")
    parser.add_argument("--variants", default="default,static-rank", help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (they include compiling)")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model: a smoke test (compiles on CUDA only)")
    parser.add_argument("--out", default=str(report.RESULTS))
    parser.add_argument("--label", default=None, help="added to the file name")
    parser.add_argument("--profile", action="store_true",
                        help="also write each process's cProfile summary (compile-profile-*.txt) beside the results")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.child:
        print(RESULT + json.dumps(finite_or_none(child(json.loads(args.child))), allow_nan=False), flush=True)
        return None
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    ranks = [int(r) for r in args.ranks.split(",")]
    out, path = run(ranks, variants, args.steps, args.warmup, args.tiny, args.out, args.label, args.profile)
    print_report(out, path)
    return out


if __name__ == "__main__":
    main()
