"""The experiment loop through DVC itself: the whole job from nothing, a one-param rerun, and a queued sweep.

    python -m benchmarks.bench_loop [--parts job,rerun,retrain,sweep,search,tpe] [--jobs N] [--train-rows 14732]
                                    [--tiny]
                                    [--out benchmarks/results] [--set training.compile=false ...] [--label baseline]

Everything runs through real DVC commands in a throwaway git+DVC copy of the project (offline/project.py's
make_project) on a Llama-3.2-1B-shaped random model with the offline tokenizer (benchmarks/harness/shapes.py)
and a SAMSum-size dataset of local files (benchmarks/harness/dataset.py), with params.yaml's values otherwise:

- job: `dvc repro` from nothing (empty DVC cache, empty torch compile cache), timed per stage;
- rerun: `dvc exp run -S lora.r=16` after the job was committed;
- retrain: `dvc repro --force --single-item train` on the job's params: the train stage with a warm compile cache;
- sweep: a grid queued with `dvc exp run --queue -S ... -S ...`, run by `dvc queue start -j N` until the queue
  is empty (or --sweep-timeout: what still runs is killed, and the file says which finished, and when);
  `dvc exp show --json` must then list every experiment with its metrics;
- search: the same grid through `python -m stages.search --grid ...` (Dask workers, trials as DVC experiments);
- tpe: the grid's space searched by TPE with successive-halving pruning (harness/search_runs.py's TPE).

With --workdir, the copy is kept, and a later call with the same --workdir and without the job part starts from
that finished job (and its warm compile cache): e.g. `--parts job,rerun` and then `--parts sweep`.

Each stage's process is timed by benchmarks/stage_timer/sitecustomize.py (start, end, torch compile seconds).
Prints a table per part and writes loop-<device>-<date>.json (device, versions, git commit, config, numbers)
after every part, so an interrupted run keeps what it measured. `--tiny` (2-layer model, ~100 rows, 4 steps)
is a CPU smoke test of a few minutes.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import yaml

from benchmarks.harness import report
from benchmarks.harness.dataset import SAMSUM_SIZES, dataset_stats, write_dataset
from benchmarks.harness.dvc_queue import run_peak_gib, run_sweep, stop_queue
from benchmarks.harness.dvc_runs import STAGE_TIMER, commit_all, part_result, read_json, restore_workspace, timed_dvc
from benchmarks.harness.overrides import parse_overrides
from benchmarks.harness.search_runs import TPE, run_search, write_search_file
from benchmarks.harness.shapes import LLAMA_3_2_1B, TINY, benchmark_model
from offline.project import dvc_env, make_project
from offline.run import merge
from samsum_qlora.params import parse_params

ROOT = Path(__file__).resolve().parents[1]
PROJECT_PARAMS = ROOT / "params.yaml"  # the values measured (the tests point it at the schema's defaults)

log = logging.getLogger(__name__)

PARTS = ("job", "rerun", "retrain", "sweep", "search", "tpe")
RERUN = ["lora.r=16"]
GRID = ["lora.r=8,16,32", "training.learning_rate=1e-4,2e-4,4e-4"]
TINY_SIZES = {"train": 96, "validation": 16, "test": 16}
TINY_PARAMS = {  # a few CPU seconds per stage: the loop is what is measured, not the model
    "training": {"max_steps": 4, "logging_steps": 1, "eval_steps": 4, "save_steps": 4, "warmup_steps": 1,
                 "per_device_eval_batch_size": 16},
    "eval": {"max_samples": 8, "max_new_tokens": 8, "batch_size": 8},
}
TOOLS = ("dvc", "dvc-task", "celery", "kombu", "dvclive", "rouge-score")

def loop_params(model_dir: Path, data_dir: Path, tiny: bool, overrides: dict[str, Any]) -> dict[str, Any]:
    """params.yaml pointed at the benchmark model and dataset (the tiny settings for --tiny), then `overrides`."""
    params = yaml.safe_load(PROJECT_PARAMS.read_text(encoding="utf-8"))
    local = {"model": {"base_model": str(model_dir), "tokenizer_type": None}, "data": {"source": str(data_dir)}}
    params = merge(merge(merge(params, local), TINY_PARAMS if tiny else {}), overrides)
    parse_params(params)  # fail before anything runs
    return params


def print_part(name: str, result: dict[str, Any]) -> None:
    print(f"\n{name}: {result['command']}  ({result['wall_s']:.1f} s)")
    if "trials" in result:
        columns = [("trial", "trial"), ("params", "params"), ("state", "state"), ("objective", "value"),
                   ("pruned at", "pruned_at_step"), ("s", "seconds")]
        print(report.table(columns, [{**t, "params": str(t["params"])} for t in result["trials"]]))
        print(f"best: {result['best']}; {result['states']}")
    elif "stages" in result:
        columns = [("stage", "stage"), ("wall s", "wall_s"), ("process s", "process_s"), ("DVC s", "dvc_s"),
                   ("work s", "work_s"), ("compile s", "compile_s"), ("GPU peak GiB", "peak_gpu_gib")]
        total = {"stage": "whole command", "wall_s": result["wall_s"]}
        print(report.table(columns, result["stages"] + [total]))
        if result["skipped"]:
            print(f"skipped: {', '.join(result['skipped'])}")
    else:
        columns = [("experiment", "name"), ("state", "state"), ("train loss", "train_loss"),
                   ("train s", "train_runtime_s"), ("rougeL", "rougeL")]
        keys = [key for key in result["experiments"][0] if "." in key] if result["experiments"] else []
        columns[2:2] = [(key, key) for key in keys]
        rows = [{**e, **{key: str(e[key]) for key in keys}} for e in result["experiments"]]  # 0.0001, not 0.000
        print(report.table(columns, rows))
        print(f"{result['experiments_with_metrics']} of {result['experiments_expected']} experiments finished with "
              f"metrics; {result['jobs']} workers ({result['jobs_rule']})")


def run(args: argparse.Namespace) -> tuple[dict[str, Any], Path]:
    parts = [p for p in PARTS if p in args.parts]
    sizes = {**(TINY_SIZES if args.tiny else SAMSUM_SIZES), **({"train": args.train_rows} if args.train_rows else {})}
    started = time.perf_counter()
    model_dir = benchmark_model(args.tiny, args.model_dir)
    overrides = parse_overrides(args.set)
    prompt = merge(yaml.safe_load(PROJECT_PARAMS.read_text(encoding="utf-8")), overrides)["prompt"]
    cache = Path(tempfile.gettempdir()) / "samsum-bench"
    data_dir = args.data_dir or cache / "samsum-{train}-{validation}-{test}".format(**sizes)
    write_dataset(data_dir, model_dir, prompt["instruction"], prompt["date_string"], sizes)
    log.info("model and data ready in %.1f s", time.perf_counter() - started)
    params = loop_params(model_dir, data_dir, args.tiny, overrides)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-loop-"))
    logs = Path(args.log_dir or work / "logs")
    logs.mkdir(parents=True, exist_ok=True)
    timings = logs / "stage-timings.jsonl"
    compile_cache = Path(args.compile_cache or work / "torch-compile-cache")
    project = work / "project"
    reused = "job" not in parts and (project / "dvc.lock").is_file()
    if reused:  # e.g. `--parts sweep` after `--parts job,rerun` with the same --workdir: start from that job
        if yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8")) != params:
            raise SystemExit(f"{project}: its params.yaml differs from this run's; use another --workdir")
        log.info("reusing the finished job in %s", project)
    else:
        if project.exists():
            raise SystemExit(f"{project} exists: run the job part in an empty --workdir")
        make_project(project, params)
    env = dvc_env(project, PYTHONPATH=os.pathsep.join(filter(None, [str(STAGE_TIMER), str(project),
                                                                     os.environ.get("PYTHONPATH")])),
                  PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                  SAMSUM_BENCH_TIMINGS=str(timings), TORCHINDUCTOR_CACHE_DIR=str(compile_cache))

    out = report.header("loop", {
        "parts": parts, "tiny": args.tiny, "model_shape": asdict(TINY if args.tiny else LLAMA_3_2_1B),
        "dataset": {"sizes": sizes, "train_through_template": dataset_stats(data_dir)},
        "params": params, "overrides": overrides, "rerun": RERUN, "grid": args.grid,
        "compile_cache": {"dir": str(compile_cache), "existed_before": compile_cache.exists()},
        "reused_job": reused,
    })
    out.update({"tools": report.package_versions(TOOLS), "cpu_cores": os.cpu_count(), "results": {}, "failed": []})
    if torch.cuda.is_available():
        out["gpu_memory_gib"] = round(torch.cuda.mem_get_info()[1] / 2**30, 1)
    path = None
    measured: dict[str, Any] = {}  # the sweep's, as it goes
    try:
        for part in parts:
            try:
                if part == "job":
                    result = part_result(timed_dvc(project, ["repro"], env, logs / "job.log"), timings, project)
                    result["tokens"] = read_json(project / "metrics/tokens.json")
                    commit_all(project, "the default job, run")
                elif part == "rerun":
                    set_args = [a for s in RERUN for a in ("-S", s)]
                    result = part_result(timed_dvc(project, ["exp", "run", *set_args], env, logs / "rerun.log"),
                                         timings, project)
                    restore_workspace(project, env)
                elif part == "retrain":
                    retrain = ["repro", "--force", "--single-item", "train"]
                    result = part_result(timed_dvc(project, retrain, env, logs / "retrain.log"), timings, project)
                    restore_workspace(project, env)
                elif part == "search":
                    grid = [a for spec in args.grid for a in ("--grid", spec)]
                    result = run_search(project, env, "grid", grid, logs / "search.log", args.sweep_timeout, timings)
                elif part == "tpe":
                    spec = write_search_file(project, "tpe", {**TPE, **({"trials": 2} if args.tiny else {})})
                    result = run_search(project, env, "tpe", [str(spec)], logs / "tpe.log", args.sweep_timeout,
                                        timings)
                else:
                    peak = run_peak_gib(out["results"].get("job"), project, timings)
                    result = run_sweep(project, env, args.grid, args.jobs, peak, logs / "sweep.log",
                                       args.sweep_timeout, measured)
            except KeyboardInterrupt:  # e.g. a time limit: the file must say this part did not finish
                out["failed"].append({"part": part, "error": "interrupted"})
                if part == "sweep" and measured:  # what it measured before, e.g. trains that ran at once
                    out["results"]["sweep"] = {**measured, "interrupted": True}
                raise
            except Exception as err:  # keep what the other parts measured
                log.exception("part %s failed", part)
                out["failed"].append({"part": part, "error": f"{type(err).__name__}: {err}"[:3000]})
                if part == "job":
                    break  # the other parts start from the finished job
                continue
            out["results"][part] = result
            print_part(part, result)
            path = write(out, args, timings)
    finally:
        path = write(out, args, timings)
        if not args.keep and not args.workdir:
            stop_queue(project, env, [])
            shutil.rmtree(work, ignore_errors=True)
    return out, path


def write(out: dict[str, Any], args: argparse.Namespace, timings: Path) -> Path:
    """The JSON results, and beside them the per-process stage timings they were computed from
    (<results>-stage-timings.jsonl)."""
    path = report.write_results(out, args.out, args.tiny, args.label)
    if timings.is_file():
        shutil.copyfile(timings, path.with_name(f"{path.stem}-stage-timings.jsonl"))
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="job,rerun,sweep", help=f"comma-separated, from {', '.join(PARTS)}")
    parser.add_argument("--jobs", type=int, default=None, help="queue workers for the sweep (default: memory rule)")
    parser.add_argument("--train-rows", type=int, default=None, help="train split size (default 14,732; --tiny 96)")
    parser.add_argument("--tiny", action="store_true", help="2-layer model, ~100 rows, 4 steps: a CPU smoke test")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="params.yaml override")
    parser.add_argument("--grid", action="append", default=None, metavar="KEY=V1,V2",
                        help=f"one -S of the queued sweep, repeatable (default: {' '.join(GRID)})")
    parser.add_argument("--sweep-timeout", type=float, default=3600, help="seconds to wait for the queue")
    parser.add_argument("--out", type=Path, default=report.RESULTS, help="folder for the JSON results")
    parser.add_argument("--label", default=None, help="appended to the file name, e.g. baseline")
    parser.add_argument("--workdir", type=Path, default=None, help="where the project copy goes (kept)")
    parser.add_argument("--log-dir", type=Path, default=None, help="dvc output and stage timings (default: workdir)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary project copy")
    parser.add_argument("--model-dir", type=Path, default=None, help="where the random model is built (reused)")
    parser.add_argument("--data-dir", type=Path, default=None, help="where the dataset is written (reused)")
    parser.add_argument("--compile-cache", type=Path, default=None,
                        help="TORCHINDUCTOR_CACHE_DIR for the stages (default: a new, empty one in the workdir)")
    args = parser.parse_args(argv)
    requested = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not requested or requested - set(PARTS):
        parser.error(f"unknown parts {sorted(requested - set(PARTS))}; choose from {', '.join(PARTS)}")
    finished_job = args.workdir is not None and (args.workdir / "project" / "dvc.lock").is_file()
    args.parts = requested if finished_job else requested | {"job"}  # the other parts start from a finished job
    args.grid = args.grid or GRID
    if args.jobs is not None and args.jobs < 1:
        parser.error("--jobs must be >= 1")
    out, path = run(args)
    for failure in out["failed"]:
        print(f"FAILED {failure['part']}: {failure['error']}")
    print(f"written to {path}")
    return out


def interrupt_on_sigterm(signum: int, frame: Any) -> None:
    """A time limit (`timeout`, a batch scheduler) ends the run like Ctrl-C: the file then says which part did
    not finish."""
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    signal.signal(signal.SIGTERM, interrupt_on_sigterm)
    sys.exit(1 if main()["failed"] else 0)
