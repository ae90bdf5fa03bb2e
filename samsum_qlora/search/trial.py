"""One trial, as a Dask worker runs it: a fresh clone of the baseline commit, `dvc exp run` with the trial's params
in it, validation losses reported to the study as DVCLive writes them (pruning stops the run), and the finished
experiment pushed back, so the user's workspace is never touched and a trial on another machine works the same."""

from __future__ import annotations

import csv
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from samsum_qlora.paths import CURVES

log = logging.getLogger(__name__)

TRAIN_LOSS = Path(CURVES) / "plots/metrics/loss.tsv"
EVAL_LOSS = Path(CURVES) / "plots/metrics/eval/loss.tsv"
TOTAL_STEPS = re.compile(r"schedule: .* (\d+) steps \(")  # the train stage's plan line (training/schedule.py)
LOG_TAIL = 4000  # characters of a failed trial's log kept in the study


@dataclass(frozen=True)
class TrialSpec:
    """Everything a worker needs, by value: it may share no disk with the driver."""

    study: str
    storage: str
    search: dict[str, Any]  # the SearchSpec as a mapping, for its pruner
    trial_id: int
    number: int
    experiment: str
    overrides: dict[str, str]  # params key -> value as `-S` writes it
    git_url: str
    baseline: str
    objective: str
    shared_cache: str | None  # one machine: the user's DVC cache; else None (pull from and push to DVC's remote)
    work_root: str | None  # where the clone goes (None: the worker's own folder)
    log_path: str | None  # where the log goes (None: the clone's folder, returned as text)
    stop_event: str
    poll_s: float = 1.0


def _run(cmd: list[str], cwd: Path, log_file: Any, env: dict[str, str]) -> int:
    log_file.write(f"$ {' '.join(cmd)}\n")
    log_file.flush()
    return subprocess.run(cmd, cwd=cwd, stdout=log_file, stderr=subprocess.STDOUT, env=env).returncode


def _rows(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f, delimiter="\t"))
    except (FileNotFoundError, csv.Error):
        return []


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size


class Watcher:
    """Reads the trial's DVCLive curves and log while it trains: progress to the study, validation losses as the
    pruner's intermediate values (negated for a maximised objective: Optuna takes them in the study's direction)."""

    def __init__(self, spec: TrialSpec, repo: Path, log_path: Path):
        import optuna

        from samsum_qlora.search.space import SearchSpec
        from samsum_qlora.search.study import pruner, quiet_optuna, storage

        quiet_optuna()
        search = SearchSpec.model_validate(spec.search)
        # RandomSampler: the worker only reports; the driver's sampler chose the params already
        study = optuna.load_study(study_name=spec.study, storage=storage(spec.storage),
                                  sampler=optuna.samplers.RandomSampler(), pruner=pruner(search))
        self.trial = optuna.trial.Trial(study, spec.trial_id)
        self.sign = -1.0 if search.direction == "maximize" else 1.0
        self.repo, self.log_path = repo, log_path
        self.reported: set[int] = set()
        self.step = self.total = 0
        self.pruned_at: int | None = None
        # the baseline's curves are in the clone (git tracks them) until the trial's training rewrites them
        self.stale = {path: _stat(repo / path) for path in (TRAIN_LOSS, EVAL_LOSS)}

    def _rows(self, path: Path) -> list[dict[str, str]]:
        if self.stale.get(path) is not None and _stat(self.repo / path) == self.stale[path]:
            return []
        self.stale[path] = None
        return _rows(self.repo / path)

    def poll(self) -> bool:
        """Report what is new; True when the pruner says stop."""
        total = self.total or self._total_steps()
        steps = [int(float(r["step"])) for r in self._rows(TRAIN_LOSS) if r.get("step")]
        step = max(steps, default=self.step)
        if (step, total) != (self.step, self.total):
            self.step, self.total = step, total
            self.trial.set_user_attr("progress", [step, total])
        for row in self._rows(EVAL_LOSS):
            at = int(float(row["step"]))
            if at not in self.reported and row.get("loss"):
                self.reported.add(at)
                self.trial.report(self.sign * float(row["loss"]), at)
                self.trial.set_user_attr("validation_loss", [at, float(row["loss"])])
                if self.trial.should_prune():
                    self.pruned_at = at
                    return True
        return False

    def _total_steps(self) -> int:
        try:
            match = TOTAL_STEPS.search(self.log_path.read_text(encoding="utf-8", errors="replace"))
        except FileNotFoundError:
            return 0
        return int(match.group(1)) if match else 0


def read_objective(repo: Path, objective: str) -> float | None:
    """The objective's value in the trial's metrics: `FILE:KEY`, or a KEY looked up in dvc.yaml's metrics files."""
    import json

    import yaml

    if ":" in objective:
        files, key = [objective.split(":", 1)[0]], objective.split(":", 1)[1]
    else:
        declared = yaml.safe_load((repo / "dvc.yaml").read_text(encoding="utf-8")).get("metrics", [])
        files, key = [f if isinstance(f, str) else next(iter(f)) for f in declared], objective
    for name in files:
        try:
            node: Any = json.loads((repo / name).read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            continue
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, (int, float)) and not isinstance(node, bool):
            return float(node)
    return None


def _stop_requested(name: str) -> bool:
    try:
        from distributed import Event

        return Event(name).is_set()
    except (ImportError, ValueError):  # not inside a Dask worker (a direct call, in tests)
        return False


def _where() -> tuple[str, str | None]:
    try:
        from distributed import get_worker

        worker = get_worker()
        return worker.address, worker.local_directory
    except (ImportError, ValueError):
        return socket.gethostname(), None


def run_trial(spec: TrialSpec) -> dict[str, Any]:
    """Run one trial to its end; {"state": complete|pruned|failed|interrupted, "value", "step", ...}."""
    worker, local_dir = _where()
    root = Path(spec.work_root or local_dir or tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f"{spec.experiment}-", dir=root))
    log_path = Path(spec.log_path) if spec.log_path else scratch / "trial.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    repo = scratch / "repo"
    # the clone's own code first, as a stage run from the clone's root imports it
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    started = time.monotonic()
    result: dict[str, Any] = {"worker": worker, "host": socket.gethostname(), "log": str(log_path)}
    try:
        with open(log_path, "a", encoding="utf-8") as out:
            outcome = _clone_run_push(spec, repo, root, out, env, log_path)
        result.update(outcome)
    finally:
        result["seconds"] = round(time.monotonic() - started, 1)
        if result.get("state") == "failed" or not spec.log_path:
            text = log_path.read_text(encoding="utf-8", errors="replace") if log_path.is_file() else ""
            result["log_tail"] = text[-LOG_TAIL:]
        shutil.rmtree(scratch, ignore_errors=True)
    return result


def _clone_run_push(spec: TrialSpec, repo: Path, root: Path, out: Any, env: dict[str, str],
                    log_path: Path) -> dict[str, Any]:
    if _run(["git", "clone", "--quiet", "--no-checkout", spec.git_url, str(repo)], root, out, env) or \
            _run(["git", "checkout", "--quiet", "--detach", spec.baseline], repo, out, env):
        return {"state": "failed", "reason": f"could not check out {spec.baseline[:8]} from {spec.git_url}"}
    cache = spec.shared_cache or str(root / "dvc-cache")
    _run(["dvc", "config", "--local", "cache.dir", cache], repo, out, env)
    # the baseline's outputs: stages the trial does not change are then not rerun (missing ones are rebuilt)
    _run(["dvc", "checkout" if spec.shared_cache else "pull", "--quiet"], repo, out, env)
    sets = [arg for key, value in spec.overrides.items() for arg in ("-S", f"{key}={value}")]
    command = [sys.executable, "-m", "samsum_qlora.search.guard", "--", "dvc", "exp", "run", "-n",
               spec.experiment, *sets]
    out.write(f"$ {' '.join(command)}\n")
    out.flush()
    watcher = Watcher(spec, repo, log_path)
    proc = subprocess.Popen(command, cwd=repo, stdout=out, stderr=subprocess.STDOUT, env=env)
    stopped = None
    while proc.poll() is None:
        time.sleep(spec.poll_s)
        if stopped is None and _stop_requested(spec.stop_event):
            stopped = "interrupted"
        elif stopped is None and watcher.poll():
            stopped = "pruned"
        if stopped:
            proc.send_signal(2)  # SIGINT: the guard stops dvc and the stage, cleanly
            proc.wait()
    if stopped is None:
        watcher.poll()
    step = watcher.step
    if stopped == "pruned":
        return {"state": stopped, "step": watcher.pruned_at, "stopped_at": step, "total_steps": watcher.total}
    if stopped:
        return {"state": stopped, "step": step, "total_steps": watcher.total}
    if proc.returncode:
        return {"state": "failed", "reason": f"dvc exp run exited with {proc.returncode}", "step": step}
    value = read_objective(repo, spec.objective)
    if value is None:
        return {"state": "failed", "reason": f"the objective {spec.objective} is not in the trial's metrics"}
    push = ["dvc", "exp", "push", "origin", spec.experiment, *(["--no-cache"] if spec.shared_cache else [])]
    if _run(push, repo, out, env):
        return {"state": "failed", "reason": f"dvc exp push origin {spec.experiment} failed", "value": value}
    return {"state": "complete", "value": value, "step": step, "total_steps": watcher.total}
