"""The experiment loop through DVC itself: the whole job from nothing, a one-param rerun, and a queued sweep.

    python -m benchmarks.bench_loop [--parts job,rerun,retrain,sweep] [--jobs N] [--train-rows 14732] [--tiny]
                                    [--out benchmarks/results] [--set training.compile=false ...] [--label baseline]

Everything runs through real DVC commands in a throwaway git+DVC copy of the project (offline/project.py's
make_project) on a Llama-3.2-1B-shaped random model with the offline tokenizer (benchmarks/llama_shaped.py)
and a SAMSum-size dataset of local files (benchmarks/samsum_size.py), with params.yaml's values otherwise:

- job: `dvc repro` from nothing (empty DVC cache, empty torch compile cache), timed per stage;
- rerun: `dvc exp run -S lora.r=16` after the job was committed;
- retrain: `dvc repro --force --single-item train` on the job's params: the train stage with a warm compile cache;
- sweep: a grid queued with `dvc exp run --queue -S ... -S ...`, run by `dvc queue start -j N` until the queue
  is empty (or --sweep-timeout: what still runs is killed, and the file says which finished, and when);
  `dvc exp show --json` must then list every experiment with its metrics.

With --workdir, the copy is kept, and a later call with the same --workdir and without the job part starts from
that finished job (and its warm compile cache): e.g. `--parts job,rerun` and then `--parts sweep`.

Each stage's process is timed by benchmarks/stage_timer/sitecustomize.py (start, end, torch compile seconds).
Prints a table per part and writes loop-<device>-<date>.json (device, versions, git commit, config, numbers)
after every part, so an interrupted run keeps what it measured. `--tiny` (2-layer model, ~100 rows, 4 steps)
is a CPU smoke test of a few minutes.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from benchmarks import report
from benchmarks.bench_train import parse_overrides
from benchmarks.llama_shaped import LLAMA_3_2_1B, TINY, benchmark_model
from benchmarks.samsum_size import SAMSUM_SIZES, dataset_stats, write_dataset
from offline.project import dvc_env, git, make_project, run_dvc
from offline.run import merge
from samsum_qlora.params import parse_params

ROOT = Path(__file__).resolve().parents[1]
PROJECT_PARAMS = ROOT / "params.yaml"  # the values measured (the tests point it at the schema's defaults)

log = logging.getLogger(__name__)

PARTS = ("job", "rerun", "retrain", "sweep")
STAGE_TIMER = Path(__file__).resolve().parent / "stage_timer"
RERUN = ["lora.r=16"]
GRID = ["lora.r=8,16,32", "training.learning_rate=1e-4,2e-4,4e-4"]
TINY_SIZES = {"train": 96, "validation": 16, "test": 16}
TINY_PARAMS = {  # a few CPU seconds per stage: the loop is what is measured, not the model
    "training": {"max_steps": 4, "logging_steps": 1, "eval_steps": 4, "save_steps": 4, "warmup_steps": 1,
                 "per_device_eval_batch_size": 16},
    "eval": {"max_samples": 8, "max_new_tokens": 8, "batch_size": 8},
}
# -j memory rule: a run needs the largest peak of the job's stages (each stage process's
# torch.cuda.max_memory_allocated, from the stage timer; else train.json's peak) times HEADROOM, for the
# allocator's fragmentation and steps longer than the job's, plus CONTEXT_GIB for each process's CUDA context.
HEADROOM = 1.25
CONTEXT_GIB = 1.0
STOP_TIMEOUT_S = 60.0  # for `dvc queue stop` and `dvc queue kill` each
CORES_PER_RUN = 2  # a run keeps one core busy feeding its GPU, compiling takes more: at most cores / 2 runs
TOOLS = ("dvc", "dvc-task", "celery", "kombu", "dvclive", "rouge-score")

RUNNING = re.compile(r"Running stage '([\w-]+)'")
SKIPPED = re.compile(r"Stage '([\w-]+)' (?:didn't change, skipping|is cached - skipping run)")
LOCKED = re.compile(r"Updating lock file")
QUEUED = re.compile(r"Queued experiment '([\w-]+)'")
MODULES = {"prepare": ("prepare", None), "tokenize_mask": ("tokenize_mask", None), "train": ("train", None),
           "evaluate_baseline": ("evaluate", "baseline"), "evaluate_adapter": ("evaluate", "adapter"),
           "compare": ("compare", None), "card": ("card", None)}


@dataclass
class DvcRun:
    """One timed dvc command: its wall time and, per stage it ran, when DVC started it and locked its outputs."""

    args: list[str]
    seconds: float
    returncode: int
    started: float
    ran: list[tuple[str, float, float]] = field(default_factory=list)  # (stage, start, end), Unix time
    skipped: list[str] = field(default_factory=list)
    tail: str = ""


def timed_dvc(cwd: Path, args: list[str], env: dict[str, str], log_file: Path) -> DvcRun:
    """Run `dvc args`, timestamping its output line by line (the whole output goes to `log_file`)."""
    log.info("$ dvc %s", " ".join(args))
    started = time.time()
    proc = subprocess.Popen(["dvc", *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", bufsize=1)
    events: list[tuple[float, str, str]] = []
    tail: list[str] = []
    with open(log_file, "a", encoding="utf-8") as out:
        out.write(f"\n$ dvc {' '.join(args)}\n")
        for line in proc.stdout:
            now = time.time()
            out.write(line)
            tail = (tail + [line])[-40:]
            if m := RUNNING.search(line):
                events.append((now, "run", m.group(1)))
            elif m := SKIPPED.search(line):
                events.append((now, "skip", m.group(1)))
            elif LOCKED.search(line):
                events.append((now, "lock", ""))
    returncode = proc.wait()
    ended = time.time()
    ran = []
    for i, (start, kind, stage) in enumerate(events):
        if kind == "run":  # ends when DVC has locked its outputs, else at the next stage or the end
            end = next((t for t, k, _ in events[i + 1 :] if k in ("lock", "run")), ended)
            ran.append((stage, start, end))
    return DvcRun(args, round(ended - started, 2), returncode, started, ran,
                  [stage for _, kind, stage in events if kind == "skip"], "".join(tail))


def read_tail(log_file: Path) -> str:
    """The output of the last command written to `log_file` (each starts with a `$ dvc ...` line)."""
    return log_file.read_text(encoding="utf-8").rsplit("\n$ dvc ", 1)[-1]


def read_timings(path: Path) -> list[dict[str, Any]]:
    """The stage processes benchmarks/stage_timer recorded (dvc's own processes and compile workers left out)."""
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in records if r["argv"] and re.search(r"[/\\]stages[/\\]\w+\.py$", r["argv"][0])]


def stage_process(stage: str, start: float, end: float, timings: list[dict[str, Any]]) -> dict[str, Any] | None:
    module, argument = MODULES.get(stage, (stage, None))
    for record in timings:
        if (Path(record["argv"][0]).stem == module and (argument is None or argument in record["argv"][1:])
                and start - 1 <= record["start"] <= end):
            return record
    return None


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def compile_seconds(record: dict[str, Any] | None) -> float | None:
    spent = (record or {}).get("compile") or {}
    return spent.get("total_wall_time")


def stage_rows(run: DvcRun, timings: list[dict[str, Any]], project: Path) -> list[dict[str, Any]]:
    """One row per stage the command ran: DVC's wall time for it, its process's, and what the stage reports."""
    rows = []
    for stage, start, end in run.ran:
        record = stage_process(stage, start, end, timings)
        process = record["end"] - record["start"] if record else None
        row: dict[str, Any] = {"stage": stage, "wall_s": round(end - start, 2),
                               "process_s": round(process, 2) if process is not None else None,
                               "dvc_s": round(end - start - process, 2) if process is not None else None,
                               "peak_gpu_gib": (record or {}).get("peak_gpu_gib")}
        if stage == "train":  # the run's facts moved from train.json to train_run.json: read either
            train = {**read_json(project / "metrics/train_run.json"), **read_json(project / "metrics/train.json")}
            row.update({"work_s": train.get("runtime_s"), "compile_s": compile_seconds(record),
                        "compile_phases": (record or {}).get("compile"),
                        "compile_counters": (record or {}).get("compile_counters"), "steps": train.get("steps"),
                        "tokens_per_second": train.get("tokens_per_s", train.get("train_tokens_per_second")),
                        "peak_memory_gib": train.get("peak_memory_gib"), "train_loss": train.get("train_loss")})
        elif stage.startswith("evaluate_"):
            metrics = read_json(project / f"metrics/{stage.removeprefix('evaluate_')}.json")
            row.update({"work_s": metrics.get("seconds"), "examples": metrics.get("examples"),
                        "gen_len_mean": metrics.get("gen_len_mean")})
        rows.append(row)
    return rows


def part_result(run: DvcRun, timings_file: Path, project: Path) -> dict[str, Any]:
    if run.returncode:
        raise RuntimeError(f"dvc {' '.join(run.args)} failed ({run.returncode}):\n{run.tail}")
    return {"command": "dvc " + " ".join(run.args), "wall_s": run.seconds,
            "stages": stage_rows(run, read_timings(timings_file), project),
            "ran": [stage for stage, _, _ in run.ran], "skipped": run.skipped}


def commit_all(project: Path, message: str) -> None:
    git(project, "add", "-A")
    git(project, "-c", "user.name=bench", "-c", "user.email=bench@example.com", "commit", "-qm", message)


def restore_workspace(project: Path, env: dict[str, str]) -> None:
    """Back to the committed job: params.yaml, dvc.lock and the metrics from git, the cached outputs from DVC."""
    git(project, "reset", "-q", "--hard")
    run_dvc(project, "checkout", "--force", env=env)


def grid_size(grid: list[str]) -> int:
    return math.prod(len(spec.partition("=")[2].split(",")) for spec in grid)


def default_jobs(peak_gib: float | None, experiments: int) -> tuple[int, str]:
    """How many queue workers (`dvc queue start -j N`): as many runs as fit in free GPU memory, capped."""
    cores = os.cpu_count() or 1
    cap = max(1, min(experiments, cores // CORES_PER_RUN))
    if not torch.cuda.is_available() or not peak_gib:
        return cap, f"no GPU reading: one worker per {CORES_PER_RUN} cores ({cores}), at most {experiments}"
    free = torch.cuda.mem_get_info()[0] / 2**30
    per_run = peak_gib * HEADROOM + CONTEXT_GIB
    fits = max(1, math.floor(free / per_run))
    return min(fits, cap), (f"floor({free:.1f} GiB free / ({peak_gib:.2f} GiB stage peak x {HEADROOM} + "
                            f"{CONTEXT_GIB} GiB)) = {fits}, capped at {cap} (experiments; {cores} cores / "
                            f"{CORES_PER_RUN})")


def run_peak_gib(job: dict[str, Any] | None, project: Path, timings: Path | None = None) -> float | None:
    """The largest GPU peak of the job's stages; for a job run by an earlier call (no `job` here), of the stage
    processes recorded in `timings` (evaluation's included); else train.json's."""
    peaks = [row["peak_gpu_gib"] for row in (job or {}).get("stages", []) if row.get("peak_gpu_gib")]
    if not peaks and job is None and timings is not None:
        peaks = [r["peak_gpu_gib"] for r in read_timings(timings) if r.get("peak_gpu_gib")]
    return max(peaks) if peaks else read_json(project / "metrics/train.json").get("peak_memory_gib")


def start_queue(project: Path, env: dict[str, str], jobs: int, log_file: Path) -> None:
    """`dvc queue start -j N`. Its workers outlive it and keep its stdout: pipes would never reach end of file."""
    with open(log_file, "a", encoding="utf-8") as out:
        out.write(f"\n$ dvc queue start --jobs {jobs}\n")
        out.flush()
        subprocess.run(["dvc", "queue", "start", "--jobs", str(jobs)], cwd=project, env=env, stdout=out,
                       stderr=subprocess.STDOUT, check=True)


def queue_status(project: Path, env: dict[str, str]) -> list[dict[str, str]]:
    """`dvc queue status` as rows {task, name, status}."""
    rows = []
    for line in run_dvc(project, "queue", "status", env=env).stdout.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[0] != "Task" and not line.startswith("Worker status"):
            rows.append({"task": fields[0], "name": fields[1], "status": fields[-1]})
    return rows


def wait_for_queue(project: Path, env: dict[str, str], timeout: float, started: float,
                   poll: float = 5.0) -> tuple[list[dict[str, str]], dict[str, float], bool]:
    """Poll `dvc queue status` until nothing is queued or running, or `timeout` seconds after `started`: the last
    listing, the seconds after `started` at which each experiment was first seen finished, and whether all were."""
    finished_at: dict[str, float] = {}
    while True:
        rows = queue_status(project, env)
        for row in rows:
            if row["status"] not in ("Queued", "Running"):
                finished_at.setdefault(row["name"], round(time.time() - started, 1))
        if rows and not any(r["status"] in ("Queued", "Running") for r in rows):
            return rows, finished_at, True
        if time.time() - started > timeout:
            log.warning("the queue was not empty after %.0f s: %s", timeout, rows)
            return rows, finished_at, False
        time.sleep(poll)


def experiments_shown(show: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every experiment `dvc exp show --json` lists: name, executor state, params and metrics files."""
    found = []
    for commit in show:
        for exp in commit.get("experiments") or []:
            for rev in exp["revs"]:
                data = rev.get("data") or {}
                found.append({
                    "name": rev.get("name") or exp.get("name"),
                    "rev": rev["rev"],
                    "state": (exp.get("executor") or {}).get("state"),
                    "error": rev.get("error"),
                    "params": ((data.get("params") or {}).get("params.yaml") or {}).get("data", {}),
                    "metrics": {path: m.get("data", {}) for path, m in (data.get("metrics") or {}).items()},
                })
    return found


def leaf(tree: dict[str, Any], dotted: str) -> Any:
    for key in dotted.split("."):
        tree = tree.get(key, {}) if isinstance(tree, dict) else {}
    return tree if tree != {} else None


def rouge_l(metrics: dict[str, dict[str, Any]]) -> float | None:
    """The adapter's ROUGE-L: metrics/adapter.json's, or the tuned side of metrics/compare.json's."""
    if "rougeL" in metrics.get("metrics/adapter.json", {}):
        return metrics["metrics/adapter.json"]["rougeL"]
    compared = metrics.get("metrics/compare.json", {}).get("rougeL")
    return compared.get("tuned") if isinstance(compared, dict) else None


def train_processes(timings: Path, started: float) -> list[dict[str, Any]]:
    """The train stages that ended since `started` (a process is timed when it exits): seconds from `started` to
    its start and end, and its compile time. Overlapping spans are experiments that trained at the same time."""
    trains = [r for r in read_timings(timings) if Path(r["argv"][0]).stem == "train" and r["start"] >= started]
    return [{"start_s": round(r["start"] - started, 1), "end_s": round(r["end"] - started, 1),
             "process_s": round(r["end"] - r["start"], 1), "compile_s": compile_seconds(r)}
            for r in sorted(trains, key=lambda r: r["start"])]


def stop_queue(project: Path, env: dict[str, str], running: list[str], timeout: float = STOP_TIMEOUT_S) -> list[str]:
    """`dvc queue stop`, then `dvc queue kill` of the experiments still running, each given `timeout` seconds (with
    several runs under way they can take long, and a benchmark under a time limit must still write its results);
    returns what did not return in time."""
    problems = []
    for args in (["queue", "stop"], ["queue", "kill", *running]) if running else (["queue", "stop"],):
        try:
            subprocess.run(["dvc", *args], cwd=project, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            problems.append(f"dvc {' '.join(args[:2])} did not return within {timeout:g} s")
            log.warning("%s", problems[-1])
    return problems


def run_sweep(project: Path, env: dict[str, str], grid: list[str], jobs: int | None, peak: float | None,
              log_file: Path, timeout: float, measured: dict[str, Any] | None = None) -> dict[str, Any]:
    """Queue the grid, run it with `jobs` workers and wait for it; fills `measured` as it goes, so that a run cut
    off (a time limit) still reports what it saw."""
    measured = {} if measured is None else measured
    queued = timed_dvc(project, ["exp", "run", "--queue", *[a for spec in grid for a in ("-S", spec)]], env, log_file)
    if queued.returncode:
        raise RuntimeError(f"queueing failed:\n{queued.tail}")
    names = QUEUED.findall(read_tail(log_file))
    expected = grid_size(grid)
    rule = "given with --jobs"
    if jobs is None:
        jobs, rule = default_jobs(peak, expected)
    log.info("sweep: %d experiments, %d workers (%s)", expected, jobs, rule)
    timings = Path(env["SAMSUM_BENCH_TIMINGS"])
    measured.update({
        "command": f"dvc exp run --queue {' '.join('-S ' + repr(s) for s in grid)} && dvc queue start -j {jobs}",
        "experiments_expected": expected, "jobs": jobs, "jobs_rule": rule, "queue_seconds": queued.seconds,
        "poll_interval_s": 5.0, "timeout_s": timeout})
    started = time.time()
    start_queue(project, env, jobs, log_file)
    final = None
    try:
        final, finished_at, emptied = wait_for_queue(project, env, timeout, started)
    finally:
        wall = time.time() - started
        measured.update({"wall_s": round(wall, 1), "train_processes": train_processes(timings, started)})
        # Stop the workers, and kill what still runs, so that the listing below is of what finished in time.
        running = [r["name"] for r in final or [] if r["status"] == "Running"]
        measured["stop_problems"] = stop_queue(project, env, running)
    measured.update({"queue_emptied": emptied, "queue_status": {r["name"]: r["status"] for r in final},
                     "finished_after_s": finished_at})
    listed = experiments_shown(json.loads(run_dvc(project, "exp", "show", "--json", env=env).stdout))
    shown = [e for e in listed if e["name"] in names]  # not the rerun's experiment, which exp show lists too
    keys = [spec.partition("=")[0] for spec in grid]
    experiments = [{
        "name": e["name"], "state": e["state"], "finished_after_s": finished_at.get(e["name"]),
        **{key: leaf(e["params"], key) for key in keys},
        "train_loss": e["metrics"].get("metrics/train.json", {}).get("train_loss"),
        "eval_loss": e["metrics"].get("metrics/train.json", {}).get("eval_loss"),
        "train_runtime_s": e["metrics"].get("metrics/train.json", {}).get("runtime_s"),
        "rougeL": rouge_l(e["metrics"]),
    } for e in shown]
    with_metrics = [e for e in experiments if e["state"] == "success" and e["train_loss"] is not None]
    measured.pop("finished_after_s")  # now per experiment
    measured.update({
        "experiments": experiments, "experiments_with_metrics": len(with_metrics),
        "all_listed_with_metrics": len(with_metrics) == expected == len(names),
        "experiments_listed_in_all": len(listed),
    })
    return measured


def loop_params(model_dir: Path, data_dir: Path, tiny: bool, overrides: dict[str, Any]) -> dict[str, Any]:
    """params.yaml pointed at the benchmark model and dataset (the tiny settings for --tiny), then `overrides`."""
    params = yaml.safe_load(PROJECT_PARAMS.read_text(encoding="utf-8"))
    local = {"model": {"base_model": str(model_dir), "tokenizer_type": None}, "data": {"source": str(data_dir)}}
    params = merge(merge(merge(params, local), TINY_PARAMS if tiny else {}), overrides)
    parse_params(params)  # fail before anything runs
    return params


def print_part(name: str, result: dict[str, Any]) -> None:
    print(f"\n{name}: {result['command']}  ({result['wall_s']:.1f} s)")
    if "stages" in result:
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
