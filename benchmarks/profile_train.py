"""Where a training step of the project's path spends its time: torch.profiler over a few optimizer steps.

    python -m benchmarks.profile_train [--shape 1B|3B|8B] [--set training.max_memory_gib=12] [--tiny] [--label L]

Prints the operators with the most GPU time and the most CPU time, and how much of the profiled wall time
the GPU was busy: a GPU busy far less than the wall time means the step is bound by the host (kernel
launches, Python), not by the GPU's arithmetic. Writes the same numbers, with the settings the run used (the
memory plan's included), to benchmarks/results/profile-train-<device>-<date>[-<shape>][-<label>].json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, TrainerCallback

from benchmarks.harness import report
from benchmarks.harness.lengths import examples_for
from benchmarks.harness.meter import ThroughputMeter
from benchmarks.harness.overrides import parse_overrides
from benchmarks.harness.setups import SEQUENCES_PER_STEP, Bench, describe_trainer, project_trainer
from benchmarks.harness.shapes import SHAPES, benchmark_model

WAIT, WARMUP, ACTIVE = 2, 1, 3


class ProfilerStep(TrainerCallback):
    def __init__(self, profiler: torch.profiler.profile) -> None:
        self.profiler = profiler

    def on_step_end(self, args, state, control, **kwargs):
        self.profiler.step()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--shape", choices=list(SHAPES), default="1B",
                        help="135M (SmolLM2-135M's shape), or Llama-3.2-1B, 3.2-3B or 3.1-8B")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=report.RESULTS, help="folder for the JSON results")
    parser.add_argument("--model-dir", type=Path, default=None, help="where the random model is built (reused)")
    parser.add_argument("--tokenizer", type=Path, default=None, help="default: offline/tiny-llama")
    parser.add_argument("--label", default=None, help="appended to the file name (after the shape)")
    args = parser.parse_args(argv)
    model_dir = benchmark_model(args.tiny, args.model_dir, args.tokenizer, shape=args.shape)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    steps = WAIT + WARMUP + ACTIVE + 1
    overrides = parse_overrides(args.set)
    with tempfile.TemporaryDirectory() as scratch:
        bench = Bench(model_dir, examples_for(tokenizer, steps * SEQUENCES_PER_STEP), steps, 0, Path(scratch),
                      overrides)
        trainer = project_trainer(bench, ThroughputMeter(tokenizer.pad_token_id, warmup=0))
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        schedule = torch.profiler.schedule(wait=WAIT, warmup=WARMUP, active=ACTIVE, repeat=1)
        report.reset_memory()
        with torch.profiler.profile(activities=activities, schedule=schedule) as profiler:
            trainer.add_callback(ProfilerStep(profiler))
            started = time.perf_counter()
            trainer.train()
            wall = time.perf_counter() - started
    events = profiler.key_averages()
    device_key = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(events.table(sort_by=device_key, row_limit=15, max_name_column_width=60))
    print(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))
    busy = report.gpu_busy_s(events)
    if busy is not None:
        print(f"GPU busy {busy / ACTIVE:.3f} s per optimizer step (profiled steps); whole run {wall:.1f} s for "
              f"{steps} steps ({wall / steps:.3f} s per step, profiler overhead included)")
    out = report.header("profile-train", {
        "shape": "tiny" if args.tiny else args.shape, "overrides": overrides, "sequences_per_step": SEQUENCES_PER_STEP,
        "steps": steps, "profiled_steps": ACTIVE, "settings": describe_trainer(trainer),
    })
    out["results"] = {
        "wall_s": round(wall, 3), "wall_s_per_step": round(wall / steps, 4),
        "gpu_busy_s_per_profiled_step": round(busy / ACTIVE, 4) if busy is not None else None,
        "peak_memory_gib": round(report.peak_memory_gib(), 3),
        "top_device_ops": report.top_ops(events, device_key),
        "top_cpu_ops": report.top_ops(events, "self_cpu_time_total"),
    }
    label = report.file_label(args.shape.lower() if args.shape != "1B" and not args.tiny else None, args.label)
    path = report.write_results(out, args.out, args.tiny, label)
    print(f"written to {path}")
    return out


if __name__ == "__main__":
    main()
