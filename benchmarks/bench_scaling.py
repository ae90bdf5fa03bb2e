"""Data-parallel scaling of the train stage's Trainer: tokens/s on 1, 2, 4... processes, one per GPU.

    python -m benchmarks.bench_scaling [--processes 1,2] [--modes strong,weak] [--steps 20] [--warmup 5] [--tiny]
                                       [--out benchmarks/results] [--model-dir DIR] [--set training.key=value ...]

Each run trains bench_train's `project` setup (the train stage's Trainer, built by samsum_qlora.training.setup,
with params.yaml's values, on the random Llama-3.2-1B-shaped model and synthetic SAMSum-length examples) for
warm-up + timed optimizer steps on N data-parallel processes, started as the train stage starts them with
training.num_processes = N (samsum_qlora.distributed: accelerate's launcher, one process per GPU, gloo processes
without CUDA); N = 1 runs as one process of its own.
Every run starts fresh processes, so each peak is its own. A step's batch (training.per_device_train_batch_size)
is split evenly between the processes:

- strong scaling: 16 sequences per optimizer step in total, 16 / N per process: the same run, done faster;
- weak scaling: 16 sequences per process, 16 x N per step: more data in the same time.

Within a mode every N draws from the same examples. Reported per run: real (non-padding) tokens per second over
the timed steps, all processes together (their tokens over the longest of their timed windows), the speedup over
N = 1 of the same mode and the efficiency (speedup / N), each process's peak memory, and the loss of the first and
last step (in strong scaling the same as on one process: data parallelism must not change the optimisation).
Targets, weak scaling: >= 1.85x the tokens/s of one GPU on 2 GPUs, >= 3.6x on 4; they are printed
beside the table, never enforced. `--tiny` runs a 2-layer model with hidden size 128, on CPU when there is no GPU,
where N processes share the same cores: a smoke test whose numbers say nothing about GPUs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from benchmarks.harness import report
from benchmarks.harness.lengths import describe, examples_for
from benchmarks.harness.overrides import parse_overrides
from benchmarks.harness.setups import SEQUENCES_PER_STEP, Bench, compute_dtype, measure
from benchmarks.harness.shapes import LLAMA_3_2_1B, TINY, benchmark_model
from benchmarks.harness.workers import Run, combine, measure_run
from offline.run import merge
from samsum_qlora import distributed
from samsum_qlora.files import finite_or_none

log = logging.getLogger("benchmarks.bench_scaling")

MODULE = "benchmarks.bench_scaling"  # what the workers run: this module with --worker
MODES = ("strong", "weak")
SEQUENCES = SEQUENCES_PER_STEP  # per optimizer step (strong) or per process and step (weak)
TARGETS = {2: 1.85, 4: 3.6}  # weak-scaling speedups over one GPU wanted, by number of GPUs
SET_HERE = ("per_device_train_batch_size", "num_processes")  # training.* keys each run sets itself
CPU_NOTE = ("no CUDA: the processes are gloo processes sharing this machine's CPU cores (the launcher gives each "
            "OMP_NUM_THREADS threads, 1 unless set); the numbers test the benchmark and say nothing about GPUs")


def batch_size(mode: str, processes: int) -> int:
    """training.per_device_train_batch_size of a run: the step's sequences over all processes (split_batches)."""
    return SEQUENCES if mode == "strong" else SEQUENCES * processes


def example_count(mode: str, total_steps: int, processes: list[int]) -> int:
    """Enough examples for the largest run of the mode, so that every N of a mode draws from the same ones."""
    return total_steps * max(batch_size(mode, n) for n in processes)


def default_processes() -> list[int]:
    """1 and 2 on CPU; on CUDA 1, 2, 4... up to the number of GPUs."""
    if not torch.cuda.is_available():
        return [1, 2]
    counts = [1]
    while counts[-1] * 2 <= torch.cuda.device_count():
        counts.append(counts[-1] * 2)
    return counts


def process_problem(processes: list[int], modes: list[str]) -> str | None:
    """Why these process counts cannot run here (None when they can)."""
    if any(n < 1 for n in processes):
        return f"--processes must be >= 1, got {processes}"
    if "strong" in modes and any(SEQUENCES % n for n in processes):
        return f"strong scaling splits {SEQUENCES} sequences evenly: --processes must divide {SEQUENCES}"
    if torch.cuda.is_available() and max(processes) > torch.cuda.device_count():
        gpus = torch.cuda.device_count()
        return (f"--processes {max(processes)}: this machine has {gpus} GPU{'s' * (gpus != 1)} and each process "
                f"takes one; use at most {gpus}")
    return None


# ---- in each worker


def work(config: Path) -> dict[str, Any] | None:
    """One process's share of a run: train, then gather every process's numbers; the main process combines them,
    writes them to run.result and returns them (the others return None)."""
    run = Run.load(config)
    distributed.quiet_replicas()
    if torch.cuda.is_available():  # before anything touches CUDA: this process's GPU, not GPU 0
        torch.cuda.set_device(distributed.local_rank())
    tokenizer = AutoTokenizer.from_pretrained(run.model_dir, trust_remote_code=False)
    examples = examples_for(tokenizer, run.num_examples, seed=0)
    bench = Bench(Path(run.model_dir), examples, run.steps, run.warmup, Path(run.scratch), run.overrides)
    share = measure("project", bench, tokenizer.pad_token_id)
    share["threads"] = torch.get_num_threads()
    shares = distributed.gather([share])
    if not distributed.is_main():
        return None
    result = combine(run, shares)
    Path(run.result).write_text(json.dumps(finite_or_none(result), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return result


# ---- in the orchestrating process


def add_speedups(results: list[dict[str, Any]]) -> None:
    """Speedup of tokens/s over one process of the same mode, efficiency = speedup / N, and the targets."""
    for r in results:
        single = next((s["tokens_per_second"] for s in results if s["mode"] == r["mode"] and s["processes"] == 1), None)
        r["speedup"] = round(r["tokens_per_second"] / single, 3) if single else None
        r["efficiency"] = round(r["speedup"] / r["processes"], 3) if single else None
        target = TARGETS.get(r["processes"]) if r["mode"] == "weak" else None
        r["target_speedup"] = target
        r["meets_target"] = r["speedup"] >= target if target and single else None


def run(
    modes: list[str],
    processes: list[int],
    steps: int,
    warmup: int,
    tiny: bool = False,
    out_dir: str | Path = report.RESULTS,
    model_dir: str | Path | None = None,
    tokenizer_dir: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], Path]:
    """Run every mode on every process count, in order; return the report and the JSON file it was written to."""
    overrides = overrides or {}
    started = time.perf_counter()
    model_dir = benchmark_model(tiny, model_dir, tokenizer_dir)
    log.info("model ready in %.1f s: %s", time.perf_counter() - started, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    counts = {mode: example_count(mode, warmup + steps, processes) for mode in modes}
    out = report.header(
        "scaling",
        {
            "modes": modes,
            "processes": processes,
            "steps": steps,
            "warmup_steps": warmup,
            "sequences_per_step": {mode: f"{SEQUENCES} in total" if mode == "strong" else f"{SEQUENCES} x processes"
                                   for mode in modes},
            "batches": "each step's batch is split evenly between the processes (accelerate split_batches)",
            "launcher": "accelerate launch through samsum_qlora.distributed (N > 1); one process of its own (N = 1)",
            "tiny": tiny,
            "model_shape": asdict(TINY if tiny else LLAMA_3_2_1B),
            "compute_dtype": str(compute_dtype()).removeprefix("torch."),
            "data": {mode: describe(examples_for(tokenizer, count, seed=0)) for mode, count in counts.items()},
            "project_overrides": overrides,
            "targets_weak_speedup": TARGETS,
        },
    )
    out["peak_memory"] = (("torch.cuda.max_memory_allocated of each process's GPU" if torch.cuda.is_available()
                           else "peak RSS of each process") + "; every run starts fresh processes")
    if not torch.cuda.is_available():
        out["note"] = CPU_NOTE
    results, failed = [], []
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as scratch:
        for mode in modes:
            for n in processes:
                size = {"training": {"per_device_train_batch_size": batch_size(mode, n), "num_processes": n}}
                stem = Path(scratch) / f"{mode}-{n}"
                job = Run(mode, n, str(model_dir), counts[mode], steps, warmup, merge(overrides, size), str(stem),
                          f"{stem}-result.json")
                log.info("%s: %d warm-up + %d timed steps of %d sequences", job.name, warmup, steps,
                         batch_size(mode, n))
                try:
                    results.append(measure_run(MODULE, job, Path(f"{stem}-run.json")))
                except Exception as err:  # one failed run must not cost the numbers of the others
                    if not isinstance(err, distributed.WorkerFailed):  # whose workers have printed their own errors
                        traceback.print_exc()
                    failed.append({"mode": mode, "processes": n, "error": f"{type(err).__name__}: {err}"[:1000]})
    add_speedups(results)
    out.update({"results": results, "failed": failed})
    return out, report.write_results(out, out_dir, tiny)


def target_cell(r: dict[str, Any]) -> str | None:
    if r["target_speedup"] is None:
        return None
    verdict = "-" if r["meets_target"] is None else ("met" if r["meets_target"] else "missed")
    return f">= {r['target_speedup']}x: {verdict}"


def print_report(out: dict[str, Any], path: Path) -> None:
    c = out["config"]
    print(f"\n{out['device']}: {c['steps']} timed optimizer steps after {c['warmup_steps']} warm-up steps; "
          f"strong scaling: {SEQUENCES} sequences per step in total, weak scaling: {SEQUENCES} per process")
    columns = [
        ("mode", "mode"),
        ("processes", "processes"),
        ("real tokens/s", "tokens_per_second"),
        ("speedup", "speedup"),
        ("efficiency", "efficiency"),
        ("peak GiB per process", "peaks"),
        ("threads", "threads_per_process"),
        ("final loss", "final_loss"),
        ("target", "target"),
    ]
    rows = [{**r, "peaks": " / ".join(f"{p:.2f}" for p in r["peak_memory_gib_per_process"]), "target": target_cell(r)}
            for r in out["results"]]
    print(report.table(columns, rows))
    targets = ", ".join(f">= {speedup}x on {n} GPUs" for n, speedup in TARGETS.items())
    print(f"targets (weak scaling, tokens/s over one GPU): {targets}; reported, not enforced")
    print(f"peak memory: {out['peak_memory']}")
    if "note" in out:
        print(f"NOTE: {out['note']}")
    for f in out["failed"]:
        print(f"FAILED {f['mode']} x{f['processes']}: {f['error']}")
    print(f"written to {path}")


def parse_processes(text: str) -> list[int]:
    try:
        return [int(n) for n in text.split(",") if n.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=parse_processes, default=None,
                        help="comma-separated process counts (default: 1,2 on CPU; 1,2,4... up to the GPUs on CUDA)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)}")
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps (default 20; --tiny: 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; --tiny: 1)")
    parser.add_argument("--tiny", action="store_true", help="2 layers, hidden 128, vocabulary 2048: a smoke test")
    parser.add_argument("--out", type=Path, default=report.RESULTS, help="folder for the JSON results")
    parser.add_argument("--model-dir", type=Path, default=None, help="where the random model is built (reused)")
    parser.add_argument("--tokenizer", type=Path, default=None, help="default: offline/tiny-llama")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="params.yaml override for every run, e.g. training.max_tokens_per_micro_batch=4096")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)  # a run's config: see work()
    args = parser.parse_args(argv)
    if args.worker is not None:
        return work(args.worker) or {}
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        parser.error(f"unknown modes in {args.modes!r}; choose from {', '.join(MODES)}")
    steps = args.steps if args.steps is not None else (2 if args.tiny else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 5)
    if steps < 1 or warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    overrides = parse_overrides(args.set)
    fixed = [f"training.{key}" for key in SET_HERE if key in overrides.get("training", {})]
    if fixed:
        parser.error(f"--set {', '.join(fixed)}: each run sets it from its mode and number of processes")
    processes = args.processes or default_processes()
    problem = process_problem(processes, modes)
    if problem:
        raise SystemExit(f"bench_scaling: {problem}")
    out, path = run(modes, processes, steps, warmup, args.tiny, args.out, args.model_dir, args.tokenizer, overrides)
    print_report(out, path)
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    sys.exit(1 if main().get("failed") else 0)
