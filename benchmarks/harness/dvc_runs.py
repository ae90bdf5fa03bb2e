"""A dvc command timed stage by stage from its own output, matched with the stage processes the stage timer
(benchmarks/stage_timer) recorded, and the per-stage rows the experiment-loop benchmark reports."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from offline.project import git, run_dvc

log = logging.getLogger(__name__)

STAGE_TIMER = Path(__file__).resolve().parents[1] / "stage_timer"  # a sitecustomize folder for the stages' PYTHONPATH
RUNNING = re.compile(r"Running stage '([\w-]+)'")
SKIPPED = re.compile(r"Stage '([\w-]+)' (?:didn't change, skipping|is cached - skipping run)")
LOCKED = re.compile(r"Updating lock file")
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
    """The recorded process of `stage` that started while DVC ran it (None if none was)."""
    module, argument = MODULES.get(stage, (stage, None))
    for record in timings:
        if (Path(record["argv"][0]).stem == module and (argument is None or argument in record["argv"][1:])
                and start - 1 <= record["start"] <= end):
            return record
    return None


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file's content, {} when it does not exist."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def compile_seconds(record: dict[str, Any] | None) -> float | None:
    """The seconds torch spent compiling in a recorded process (None if it compiled nothing)."""
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
    """A part's numbers from its dvc command; raises with the command's output when it failed."""
    if run.returncode:
        raise RuntimeError(f"dvc {' '.join(run.args)} failed ({run.returncode}):\n{run.tail}")
    return {"command": "dvc " + " ".join(run.args), "wall_s": run.seconds,
            "stages": stage_rows(run, read_timings(timings_file), project),
            "ran": [stage for stage, _, _ in run.ran], "skipped": run.skipped}


def commit_all(project: Path, message: str) -> None:
    """Commit everything in the project copy."""
    git(project, "add", "-A")
    git(project, "-c", "user.name=bench", "-c", "user.email=bench@example.com", "commit", "-qm", message)


def restore_workspace(project: Path, env: dict[str, str]) -> None:
    """Back to the committed job: params.yaml, dvc.lock and the metrics from git, the cached outputs from DVC."""
    git(project, "reset", "-q", "--hard")
    run_dvc(project, "checkout", "--force", env=env)
