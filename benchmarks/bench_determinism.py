"""Run-to-run spread: the same short job trained and evaluated several times, with training.deterministic off or on.

    python -m benchmarks.bench_determinism --deterministic false --runs 3 [--model 1b|offline] [--resume]
                                           [--train-rows 3200] [--budget-s 480] [--tiny] [--out benchmarks/results]

Each run trains from nothing (same params, data and seed) and evaluates the adapter on the test split, through
the stages themselves, in a project copy (offline/project.py's make_project), on SAMSum-length local dialogues
(benchmarks/harness/dataset.py) and either the Llama-3.2-1B-shaped random model with the offline tokenizer
(benchmarks/harness/shapes.py: the default job's speed; it barely learns the task in a short run) or the offline
profile's tiny trained model with that profile's params (it learns the task, so its ROUGE-L spread means
something); the baseline is evaluated once. Reported per run: the adapter's SHA-256, the
final losses, tokens/s, ROUGE-L and the gain's bootstrap interval from compare; then the spread (max - min) of
ROUGE-L and whether the adapters are bit-identical. `--resume` adds one run interrupted (SIGINT) after its first
checkpoint and resumed by running the stage again, to compare with the uninterrupted ones. Runs stop being
started when --budget-s would be exceeded; the file is written after every run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import report
from benchmarks.harness.dvc_runs import read_json
from benchmarks.harness.shapes import benchmark_model
from benchmarks.harness.stage_runs import TINY_SIZES, job_params, job_project, run_stage
from samsum_qlora.training.checkpoints import checkpoint_problem

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]


def interrupted_train(project: Path, env: dict[str, str], step: int, timeout: float = 600) -> None:
    """Start the train stage and stop it with SIGINT (as Ctrl-C does) once checkpoint-<step> is complete."""
    checkpoint = project / "models" / "checkpoints" / f"checkpoint-{step}"
    proc = subprocess.Popen([sys.executable, "-m", "stages.train"], cwd=project, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if checkpoint.is_dir() and checkpoint_problem(checkpoint) is None:
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.2)
    proc.wait(timeout=120)


def one_run(project: Path, env: dict[str, str], interrupt_at: int | None) -> dict[str, Any]:
    """Train from nothing (or interrupted after the checkpoint at step `interrupt_at`, then resumed), evaluate,
    compare."""
    shutil.rmtree(project / "models", ignore_errors=True)
    started = time.perf_counter()
    if interrupt_at:
        interrupted_train(project, env, interrupt_at)
    run_stage(project, env, "stages.train")
    run_stage(project, env, "stages.evaluate", "adapter")
    run_stage(project, env, "stages.compare")
    train, run, adapter, compare = (read_json(project / f"metrics/{n}.json") for n in
                                    ("train", "train_run", "adapter", "compare"))
    weights = (project / "models/adapter/adapter_model.safetensors").read_bytes()
    return {
        "resumed_from_step": run["resumed_from_step"], "adapter_sha256": hashlib.sha256(weights).hexdigest(),
        "train_loss": train["train_loss"], "eval_loss": train["eval_loss"], "tokens_per_s": train["tokens_per_s"],
        "train_runtime_s": train["runtime_s"], "rougeL": adapter["rougeL"], "compare": compare,
        "predictions_sha256": hashlib.sha256((project / "data/predictions/adapter.jsonl").read_bytes()).hexdigest(),
        "wall_s": round(time.perf_counter() - started, 1),
        **({"compare_rouge": read_json(project / "metrics/compare_rouge.json")}
           if (project / "metrics/compare_rouge.json").is_file() else {}),
    }


def spread(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """ROUGE-L's spread over the uninterrupted runs, and whether every run (resumed too) gave the same adapter."""
    fresh = [r for r in runs if not r["resumed_from_step"]]
    scores = [100 * r["rougeL"] for r in fresh]
    return {
        "runs": len(fresh),
        "rougeL_points": [round(s, 2) for s in scores],
        "rougeL_max_minus_min": round(max(scores) - min(scores), 3) if scores else None,
        "rougeL_sd": round(statistics.stdev(scores), 3) if len(scores) > 1 else None,
        "identical_adapters": len({r["adapter_sha256"] for r in runs}) == 1,
        "identical_predictions": len({r["predictions_sha256"] for r in runs}) == 1,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deterministic", choices=("true", "false"), required=True)
    parser.add_argument("--model", choices=("1b", "offline"), default="1b",
                        help="the random Llama-3.2-1B-shaped model (speed), or the offline profile's tiny trained "
                             "model with its params (it learns the task: ROUGE that means something)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--resume", action="store_true", help="one more run, interrupted and resumed")
    parser.add_argument("--train-rows", type=int, default=3200, help="one epoch: rows / 16 optimizer steps")
    parser.add_argument("--test-rows", type=int, default=819)
    parser.add_argument("--budget-s", type=float, default=480, help="start no run that would end after this")
    parser.add_argument("--tiny", action="store_true", help="2-layer model, 64 rows, 6 steps: a CPU smoke test")
    parser.add_argument("--out", default=str(report.RESULTS))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.perf_counter()
    deterministic = args.deterministic == "true"
    label = report.file_label("offline" if args.model == "offline" else None, f"deterministic-{args.deterministic}")
    sizes = TINY_SIZES if args.tiny else {"train": args.train_rows, "validation": 100, "test": args.test_rows}
    offline = args.model == "offline"
    model_dir = ROOT / "offline" / "tiny-llama" if offline else benchmark_model(args.tiny)
    work, project, params, env = job_project(job_params(model_dir, deterministic, args.tiny, offline), sizes,
                                             "bench-determinism-")
    out = report.header("determinism", {"deterministic": deterministic, "model": args.model, "sizes": sizes,
                                        "params": params,
                                        "runs": args.runs, "resume": args.resume, "tiny": args.tiny})
    out["runs"] = []
    try:
        for name in ("prepare", "tokenize_mask"):
            run_stage(project, env, f"stages.{name}")
        run_stage(project, env, "stages.evaluate", "baseline")
        out["baseline_rougeL"] = read_json(project / "metrics/baseline.json")["rougeL"]
        plan = [False] * args.runs + ([True] if args.resume else [])
        for resume in plan:
            last = out["runs"][-1]["wall_s"] if out["runs"] else 0
            if time.perf_counter() - started + last * (1.6 if resume else 1.1) > args.budget_s:
                log.warning("stopping: another run would pass --budget-s %s", args.budget_s)
                break
            out["runs"].append(one_run(project, env, params["training"]["save_steps"] if resume else None))
            out["spread"] = spread(out["runs"])
            log.info("run %d: %s", len(out["runs"]), {k: v for k, v in out["runs"][-1].items() if k != "compare"})
            path = report.write_results(out, args.out, args.tiny, label)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    path = report.write_results(out, args.out, args.tiny, label)
    print(json.dumps(out.get("spread"), indent=1, allow_nan=False), f"\nwritten to {path}")
    return out


if __name__ == "__main__":
    main()
