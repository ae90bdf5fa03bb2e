"""Small data: the offline profile on a few training rows, under the schedules a user would try, each trained and
evaluated through the stages and compared with the untuned base.

    python -m benchmarks.bench_small_data [--train-rows 96] [--out benchmarks/results]

The offline profile (offline/params.yaml: the tiny trained model, batch 8, learning rate 0.002) with its step
count left to the data (max_steps -1) and data.train_samples = --train-rows; all 40 test dialogues. Variants:

- fixed-warmup: one epoch with the former default's 50 warmup steps (more steps than the run has);
- ratio: one epoch with training.warmup_ratio's default;
- epochs-N-fixed-warmup, epochs-N: N epochs, so the run reaches some 100 optimizer steps, with the 50 warmup
  steps and with the ratio.

Per variant: the schedule the train stage planned (steps, warmup, its warnings), the final losses, ROUGE-L of
the base and the adapter, the gain and its 95% bootstrap interval from compare.
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.harness import report
from benchmarks.harness.dvc_runs import read_json
from benchmarks.harness.stage_runs import run_stage, stage_env
from offline.project import make_project
from offline.run import merge, profile_over_defaults

log = logging.getLogger(__name__)


def variants(train_rows: int, batch: int) -> dict[str, dict[str, Any]]:
    """The training sections compared, by name."""
    epochs = max(2, math.ceil(100 / math.ceil(train_rows / batch)))
    return {
        "fixed-warmup": {"num_train_epochs": 1.0, "warmup_steps": 50},
        "ratio": {"num_train_epochs": 1.0, "warmup_steps": None},
        f"epochs-{epochs}-fixed-warmup": {"num_train_epochs": float(epochs), "warmup_steps": 50},
        f"epochs-{epochs}": {"num_train_epochs": float(epochs), "warmup_steps": None},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-rows", type=int, default=96)
    parser.add_argument("--out", default=str(report.RESULTS))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import yaml

    params = profile_over_defaults(data={"train_samples": args.train_rows}, training={"max_steps": -1})
    batch = params["training"]["per_device_train_batch_size"]
    work = Path(tempfile.mkdtemp(prefix="bench-small-data-"))
    out = report.header("small-data", {"train_rows": args.train_rows, "params": params,
                                       "variants": variants(args.train_rows, batch)})
    out["results"] = {}
    try:
        project = make_project(work / "project", params)
        env = stage_env(project, work / "compile-cache")
        for name in ("prepare", "tokenize_mask"):
            run_stage(project, env, f"stages.{name}")
        run_stage(project, env, "stages.evaluate", "baseline")
        for name, training in variants(args.train_rows, batch).items():
            run_params = merge(params, {"training": training})
            (project / "params.yaml").write_text(yaml.safe_dump(run_params, sort_keys=False), encoding="utf-8")
            shutil.rmtree(project / "models", ignore_errors=True)
            for stage in (("stages.train",), ("stages.evaluate", "adapter"), ("stages.compare",)):
                run_stage(project, env, *stage)
            train, run, compare = (read_json(project / f"metrics/{n}.json") for n in ("train", "train_run", "compare"))
            out["results"][name] = {"training": training, "schedule": run["schedule"],
                                    "train_loss": train["train_loss"], "eval_loss": train["eval_loss"],
                                    "rougeL": compare["rougeL"]}
            log.info("%s: %s", name, out["results"][name])
            report.write_results(out, args.out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    path = report.write_results(out, args.out)
    columns = [("variant", "name"), ("steps", "steps"), ("warmup", "warmup"), ("base", "base"), ("tuned", "tuned"),
               ("gain", "gain"), ("95% interval", "interval")]
    rows = [{"name": name, "steps": r["schedule"]["total_steps"], "warmup": r["schedule"]["warmup_steps"],
             **{k: round(100 * r["rougeL"][k], 2) for k in ("base", "tuned", "gain")},
             "interval": f"{100 * r['rougeL']['low']:+.2f} to {100 * r['rougeL']['high']:+.2f}"}
            for name, r in out["results"].items()]
    print(report.table(columns, rows), f"\nwritten to {path}")
    return out


if __name__ == "__main__":
    main()
