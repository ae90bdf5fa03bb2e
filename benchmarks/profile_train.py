"""Where a training step of the project's path spends its time: torch.profiler over a few optimizer steps.

    python -m benchmarks.profile_train [--set training.gradient_checkpointing=false] [--tiny]

Prints the operators with the most GPU time and the most CPU time, and how much of the profiled wall time
the GPU was busy: a GPU busy far less than the wall time means the step is bound by the host (kernel
launches, Python), not by the GPU's arithmetic.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, TrainerCallback

from benchmarks.bench_train import SEQUENCES_PER_STEP, Bench, ThroughputMeter, parse_overrides, project_trainer
from benchmarks.lengths import examples_for
from benchmarks.llama_shaped import benchmark_model

WAIT, WARMUP, ACTIVE = 2, 1, 3


class ProfilerStep(TrainerCallback):
    def __init__(self, profiler: torch.profiler.profile) -> None:
        self.profiler = profiler

    def on_step_end(self, args, state, control, **kwargs):
        self.profiler.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    model_dir = benchmark_model(args.tiny)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    steps = WAIT + WARMUP + ACTIVE + 1
    with tempfile.TemporaryDirectory() as scratch:
        bench = Bench(model_dir, examples_for(tokenizer, steps * SEQUENCES_PER_STEP), steps, 0, Path(scratch),
                      parse_overrides(args.set))
        trainer = project_trainer(bench, ThroughputMeter(tokenizer.pad_token_id, warmup=0))
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        schedule = torch.profiler.schedule(wait=WAIT, warmup=WARMUP, active=ACTIVE, repeat=1)
        with torch.profiler.profile(activities=activities, schedule=schedule) as profiler:
            trainer.add_callback(ProfilerStep(profiler))
            started = time.perf_counter()
            trainer.train()
            wall = time.perf_counter() - started
    events = profiler.key_averages()
    device_key = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(events.table(sort_by=device_key, row_limit=15, max_name_column_width=60))
    print(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))
    if torch.cuda.is_available():
        # The kernels' own rows only: an operator's row repeats the device time of the kernels it launched.
        busy = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA) / 1e6
        print(f"GPU busy {busy / ACTIVE:.3f} s per optimizer step (profiled steps); whole run {wall:.1f} s for "
              f"{steps} steps ({wall / steps:.3f} s per step, profiler overhead included)")


if __name__ == "__main__":
    main()
