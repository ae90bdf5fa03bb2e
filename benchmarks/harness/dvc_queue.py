"""A grid of experiments through DVC's own queue: `dvc exp run --queue`, `dvc queue start -j N` with N from a memory
rule, polling `dvc queue status`, stopping it within a time limit, and what `dvc exp show --json` lists."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness.dvc_runs import compile_seconds, read_json, read_tail, read_timings, timed_dvc
from offline.project import run_dvc
from samsum_qlora.search.cluster import CONTEXT_GIB, CORES_PER_RUN, HEADROOM, runs_that_fit

log = logging.getLogger(__name__)

QUEUED = re.compile(r"Queued experiment '([\w-]+)'")
# -j: the search's memory rule (samsum_qlora/search/cluster.py) on the largest peak of the job's stages (each stage
# process's torch.cuda.max_memory_allocated, from the stage timer; else train.json's peak)
STOP_TIMEOUT_S = 60.0  # for `dvc queue stop` and `dvc queue kill` each

def grid_size(grid: list[str]) -> int:
    """How many experiments a grid of `KEY=V1,V2` specs makes."""
    return math.prod(len(spec.partition("=")[2].split(",")) for spec in grid)


def default_jobs(peak_gib: float | None, experiments: int) -> tuple[int, str]:
    """How many queue workers (`dvc queue start -j N`): as many runs as fit in free GPU memory, capped."""
    cores = os.cpu_count() or 1
    cap = max(1, min(experiments, cores // CORES_PER_RUN))
    if not torch.cuda.is_available() or not peak_gib:
        return cap, f"no GPU reading: one worker per {CORES_PER_RUN} cores ({cores}), at most {experiments}"
    free = torch.cuda.mem_get_info()[0] / 2**30
    fits = runs_that_fit(free, peak_gib)
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
    """The value at a dotted key of a nested dict (None when absent)."""
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
