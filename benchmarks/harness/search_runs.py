"""A search through `python -m stages.search` in the benchmark's project copy: timed, with every trial's params,
state, objective, pruning step and seconds read back from its study, and the experiments `dvc exp show` lists."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks.harness.dvc_queue import experiments_shown, train_processes
from offline.project import run_dvc

log = logging.getLogger(__name__)

# The 3 x 3 grid's space, searched by TPE with pruning: asynchronous successive halving needs no finished trials
# before it prunes, so trials that start together can be stopped at their first validation (step 100).
TPE = {"sampler": "tpe", "pruner": "halving", "prune_after_steps": 100, "trials": 6, "workers_per_gpu": 6,
       "space": {"lora.r": [8, 16, 32], "training.learning_rate": [1e-4, 2e-4, 4e-4]}}


def study_trials(project: Path, name: str) -> list[dict[str, Any]]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{project / '.search' / (name + '.db')}")
    return [{"trial": t.number, "params": t.params, "state": t.state.name.lower(),
             "value": t.value if t.state.name == "COMPLETE" else None,  # pruned: Optuna keeps the last loss
             "pruned_at_step": t.user_attrs.get("step") if t.state.name == "PRUNED" else None,
             "seconds": t.user_attrs.get("seconds"), "interrupted": bool(t.user_attrs.get("interrupted"))}
            for t in study.get_trials(deepcopy=False)]


def run_search(project: Path, env: dict[str, str], name: str, args: list[str], log_file: Path, timeout: float,
               timings: Path) -> dict[str, Any]:
    """`python -m stages.search ARGS --name NAME`, timed; a search past `timeout` gets Ctrl-C (and says so)."""
    cmd = [sys.executable, "-m", "stages.search", *args, "--name", name]
    log.info("$ %s", " ".join(cmd[1:]))
    started = time.time()
    with open(log_file, "a", encoding="utf-8") as out:
        out.write(f"\n$ {' '.join(cmd[1:])}\n")
        out.flush()
        proc = subprocess.Popen(cmd, cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            returncode = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(2)
            returncode = proc.wait(180)
    wall = round(time.time() - started, 1)
    trials = study_trials(project, name)
    shown = {e["name"] for e in experiments_shown(json.loads(run_dvc(project, "exp", "show", "--json",
                                                                       env=env).stdout))}
    done = [t for t in trials if t["state"] == "complete"]
    best = max(done, key=lambda t: t["value"]) if done else None
    return {"command": " ".join(cmd[1:]), "wall_s": wall, "returncode": returncode, "timed_out": wall >= timeout,
            "trials": trials, "best": best,
            "states": {s: sum(t["state"] == s for t in trials) for s in {t["state"] for t in trials}},
            "experiments_shown": sorted(n for n in shown if n.startswith(f"{name}-")),
            "trains": train_processes(timings, started)}


def write_search_file(project: Path, name: str, spec: dict[str, Any]) -> Path:
    path = project / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, **spec}, sort_keys=False), encoding="utf-8")
    return path
