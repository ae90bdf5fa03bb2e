"""A data-parallel benchmark run handed to fresh worker processes: its config as a JSON file, the processes started
as the train stage starts them (samsum_qlora.distributed), and every process's numbers combined into the run's."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.harness import report
from samsum_qlora import distributed


@dataclass
class Run:
    """One run, as the orchestrating process hands it to the workers (a JSON file)."""

    mode: str
    processes: int
    model_dir: str
    num_examples: int  # examples_for(tokenizer, num_examples, seed=0) are trained on
    steps: int
    warmup: int
    overrides: dict[str, Any]  # params.yaml overrides: the user's --set, and the batch size of this mode and N
    scratch: str  # the trainers' output_dir (nothing is saved there)
    result: str  # where the main process writes the run's numbers

    @property
    def name(self) -> str:
        return f"{self.mode} x{self.processes}"

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2, allow_nan=False) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> Run:
        return cls(**json.loads(path.read_text(encoding="utf-8")))


@contextlib.contextmanager
def importable_here() -> Iterator[None]:
    """This checkout on the workers' PYTHONPATH: `python -m benchmarks...` then works from any folder (the editable
    install makes only stages and offline importable)."""
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(report.ROOT), before) if p)
    try:
        yield
    finally:
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before


def start(module: str, run: Run, config: Path) -> None:
    """Run `python -m module --worker config` for `run` and wait: N > 1 through the train stage's launcher, N = 1
    as one process."""
    run.save(config)
    with importable_here():
        if run.processes > 1:
            distributed.launch(module, ["--worker", str(config)], run.processes, f"scaling run {run.name}")
            return
        code = subprocess.run([sys.executable, "-m", module, "--worker", str(config)], check=False).returncode
    if code:
        raise RuntimeError(f"the worker exited with code {code}")


def measure_run(module: str, run: Run, config: Path) -> dict[str, Any]:
    """Run `run` (its config written to `config`) and return the numbers its main process wrote."""
    started = time.perf_counter()
    start(module, run, config)
    path = Path(run.result)
    if not path.is_file():
        raise RuntimeError(f"the workers ended without writing {path}")
    result = json.loads(path.read_text(encoding="utf-8"))
    result["wall_seconds"] = round(time.perf_counter() - started, 2)  # starting processes and loading included
    return result


def combine(run: Run, shares: list[dict[str, Any]]) -> dict[str, Any]:
    """The run's numbers from every process's: tokens of all processes over the longest timed window."""
    main = shares[0]  # the loss is the same on every process: the Trainer logs its mean over them
    window = max(s["timed_seconds"] for s in shares)
    tokens = [s["real_tokens"] for s in shares]
    peaks = [s["peak_memory_gib"] for s in shares]
    return {
        "mode": run.mode,
        "processes": len(shares),
        "sequences_per_step": main["sequences_per_step"],  # all processes together
        "sequences_per_process": main["sequences_per_step"] // len(shares),
        "tokens_per_second": round(sum(tokens) / window, 1),
        "timed_steps": main["timed_steps"],
        "timed_seconds": window,
        "seconds_per_step": round(window / main["timed_steps"], 4),
        "slowest_step_seconds": max(s["slowest_step_seconds"] for s in shares),
        "warmup_seconds": max(s["warmup_seconds"] for s in shares),
        "real_tokens": sum(tokens),
        "real_tokens_per_process": tokens,
        "loss_tokens": sum(s["loss_tokens"] for s in shares),
        "timed_seconds_per_process": [s["timed_seconds"] for s in shares],
        "peak_memory_gib": max(peaks),
        "peak_memory_gib_per_process": peaks,
        "threads_per_process": main["threads"],
        "first_loss": main["first_loss"],
        "final_loss": main["final_loss"],
        "settings": main["settings"],
    }
