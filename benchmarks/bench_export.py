"""The export's check on the default job's shape: train a short job, evaluate it, then export and check the merged
folder against the evaluated summaries, for each requested dtype and base weights.

    python -m benchmarks.bench_export [--variants auto:quantized,bfloat16:original] [--train-rows 1600]
                                      [--check-examples 64] [--tiny] [--out benchmarks/results]

The job runs through the stages in a project copy, on the Llama-3.2-1B-shaped random model with the offline
tokenizer and SAMSum-length local dialogues (as benchmarks/bench_determinism.py, deterministic off). Each variant
runs `python -m stages.export --dtype D --base-weights W` and keeps its export_check.json (from the folder, or from
the rejected one when the check failed) and its wall time.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import report
from benchmarks.harness.dvc_runs import read_json
from benchmarks.harness.shapes import benchmark_model
from benchmarks.harness.stage_runs import TINY_SIZES, job_params, job_project, run_stage

log = logging.getLogger(__name__)


def export_variant(project: Path, env: dict[str, str], dtype: str, weights: str, examples: int) -> dict[str, Any]:
    """One export with its check; the record it wrote, its exit code and wall time."""
    out = f"models/merged-{dtype}-{weights}"
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "stages.export", "--out", out, "--dtype", dtype, "--base-weights",
                           weights, "--check-examples", str(examples)], cwd=project, env=env, capture_output=True,
                          text=True)
    folder = project / out if (project / out).is_dir() else project / f"{out}.rejected"
    record = read_json(folder / "export_check.json") if (folder / "export_check.json").is_file() else None
    last = proc.stderr.strip().splitlines()[-1:] if proc.returncode else []
    return {"dtype": dtype, "base_weights": weights, "returncode": proc.returncode, "record": record,
            "error": last[0] if last else None, "wall_s": round(time.perf_counter() - started, 1)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="auto:quantized,bfloat16:original", help="DTYPE:BASE_WEIGHTS,...")
    parser.add_argument("--train-rows", type=int, default=1600, help="one epoch: rows / 16 optimizer steps")
    parser.add_argument("--check-examples", type=int, default=64)
    parser.add_argument("--tiny", action="store_true", help="2-layer model, 64 rows, 6 steps: a CPU smoke test")
    parser.add_argument("--out", default=str(report.RESULTS))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sizes = TINY_SIZES if args.tiny else {"train": args.train_rows, "validation": 100, "test": args.check_examples}
    model_dir = benchmark_model(args.tiny)
    work, project, params, env = job_project(job_params(model_dir, False, args.tiny, offline=False), sizes,
                                             "bench-export-")
    out = report.header("export", {"sizes": sizes, "params": params, "variants": args.variants,
                                   "check_examples": args.check_examples, "tiny": args.tiny})
    out["exports"] = []
    try:
        for name in ("prepare", "tokenize_mask", "train"):
            run_stage(project, env, f"stages.{name}")
        run_stage(project, env, "stages.evaluate", "adapter")
        out["adapter_rougeL"] = read_json(project / "metrics/adapter.json")["rougeL"]
        for variant in args.variants.split(","):
            dtype, weights = variant.split(":")
            out["exports"].append(export_variant(project, env, dtype, weights, args.check_examples))
            log.info("%s", json.dumps(out["exports"][-1], allow_nan=False))
            report.write_results(out, args.out, args.tiny)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    path = report.write_results(out, args.out, args.tiny)
    print(f"written to {path}")
    return out


if __name__ == "__main__":
    main()
