"""The search's loop: ask Optuna for a trial's params, run it on a free Dask worker, tell Optuna how it ended, and
say how every running trial is doing; Ctrl-C stops the trials and leaves the study to be continued."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from samsum_qlora.search.space import SearchSpec, dvc_value
from samsum_qlora.search.study import (
    INTERRUPTED,
    distributions,
    experiment_name,
    finished_count,
    mark_interrupted,
    param_value,
)
from samsum_qlora.search.trial import TrialSpec, run_trial

log = logging.getLogger(__name__)

PROGRESS_S = 10.0  # how often the running trials' progress is said, at most
STOP_WAIT_S = 120.0  # after Ctrl-C, how long running trials get to stop cleanly


@dataclass(frozen=True)
class Where:
    """Where trials get their baseline and send their experiment: this repository (one machine) or remotes."""

    repo: Path
    git_url: str
    baseline: str
    shared_cache: str | None  # one machine: the user's DVC cache
    work_root: str | None  # one machine: clones under .dvc/tmp/search/; else each worker's own folder
    log_dir: Path
    storage: str
    remote: str | None  # the git remote trials push to, which the driver pulls from

    def trial_log(self, number: int) -> Path:
        return self.log_dir / f"trial-{number}.log"


def stop_event(spec: SearchSpec) -> str:
    """The Dask event that tells a study's running trials to stop (Ctrl-C)."""
    return f"{spec.name}-stop"


def trial_spec(spec: SearchSpec, where: Where, trial: Any) -> TrialSpec:
    overrides = {key: dvc_value(param_value(value)) for key, value in trial.params.items()}
    local = where.remote is None
    return TrialSpec(
        study=spec.name, storage=where.storage, search=spec.model_dump(), trial_id=trial._trial_id,
        number=trial.number, experiment=experiment_name(spec.name, trial.number), overrides=overrides,
        git_url=where.git_url, baseline=where.baseline, objective=spec.objective, shared_cache=where.shared_cache,
        work_root=where.work_root, log_path=str(where.trial_log(trial.number)) if local else None,
        stop_event=stop_event(spec))


def _tell(study: Any, number: int, result: dict[str, Any], where: Where) -> str:
    """Record a trial's end in the study; the state's name."""
    from optuna.trial import TrialState

    trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
    for key in ("seconds", "worker", "host", "reason", "step", "stopped_at", "total_steps"):
        if result.get(key) is not None:
            study._storage.set_trial_user_attr(trial_id, key, result[key])
    if result.get("log_tail") is not None:
        path = where.trial_log(number)
        if not path.is_file():
            path.write_text(result["log_tail"], encoding="utf-8")
    study._storage.set_trial_user_attr(trial_id, "log", str(where.trial_log(number)))
    state = result["state"]
    if state == "complete":
        study.tell(number, result["value"])
    elif state == "pruned":
        study.tell(number, state=TrialState.PRUNED)
    else:
        study.tell(number, state=TrialState.FAIL)
    return state


def _say_progress(study: Any, total: int, said: dict[int, Any]) -> None:
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        progress = t.user_attrs.get("progress")
        loss = t.user_attrs.get("validation_loss")
        if progress and said.get(t.number) != (progress, loss):
            said[t.number] = (progress, loss)
            step, steps = progress
            extra = f", validation loss {loss[1]:.4f} at step {loss[0]}" if loss else ""
            log.info("trial %d: step %d/%s%s", t.number, step, steps or "?", extra)
    log.info("%d of %d trials finished", finished_count(study), total)


def run_trials(study: Any, spec: SearchSpec, where: Where, client: Any) -> bool:
    """Run trials until the study has spec.trial_count() finished ones; False when Ctrl-C stopped it."""
    from distributed import Event, wait

    total = spec.trial_count()
    space = distributions(spec)
    stop = Event(stop_event(spec), client=client)
    stop.clear()
    running: dict[Any, Any] = {}  # future -> trial
    said: dict[int, Any] = {}
    last_said = time.monotonic()
    try:
        while True:
            slots = sum(client.nthreads().values()) or 1
            while len(running) < slots and finished_count(study) + len(running) < total:
                trial = study.ask(space)
                ts = trial_spec(spec, where, trial)
                log.info("trial %d starts: %s", trial.number,
                         " ".join(f"{k}={v}" for k, v in ts.overrides.items()))
                running[client.submit(run_trial, ts, key=f"{ts.experiment}-{time.time_ns()}", pure=False)] = trial
            if not running:
                return True
            try:
                done = wait(list(running), timeout=PROGRESS_S,
                            return_when="FIRST_COMPLETED").done
            except TimeoutError:
                done = set()
            for future in done:
                trial = running.pop(future)
                result = _outcome(future)
                state = _tell(study, trial.number, result, where)
                if state == "complete":
                    _pull(where, experiment_name(spec.name, trial.number))
                what = f"{spec.objective} {result['value']:.4f}" if state == "complete" else (
                    f"at step {result.get('step')}" if state == "pruned" else result.get("reason", ""))
                log.info("trial %d %s in %.0f s: %s", trial.number, state, result.get("seconds", 0), what)
            if time.monotonic() - last_said >= PROGRESS_S:
                _say_progress(study, total, said)
                last_said = time.monotonic()
    except KeyboardInterrupt:
        log.warning("stopping %d running trials (Ctrl-C); run the same command again to continue", len(running))
        stop.set()
        with contextlib.suppress(TimeoutError, KeyboardInterrupt):
            wait(list(running), timeout=STOP_WAIT_S)
        for future, trial in running.items():
            result = _outcome(future) if future.done() else {"state": INTERRUPTED}
            if result["state"] in ("complete", "pruned"):  # it ended before the stop reached it
                _tell(study, trial.number, result, where)
            else:
                mark_interrupted(study, trial.number, trial.params)
        return False


def _outcome(future: Any) -> dict[str, Any]:
    """The trial's result, or why it has none (a worker that died twice under it, an error in the runner)."""
    try:
        return future.result()
    except Exception as err:  # KilledWorker and any error of the runner itself
        from distributed import KilledWorker

        reason = ("the worker running it died, and so did the one that retried it" if isinstance(err, KilledWorker)
                  else f"{type(err).__name__}: {err}")
        return {"state": "failed", "reason": reason}


def _pull(where: Where, experiment: str) -> None:
    """Bring a trial's experiment from the git and DVC remotes it was pushed to (one machine: it is here)."""
    if where.remote is None:
        return
    import subprocess

    proc = subprocess.run(["dvc", "exp", "pull", where.remote, experiment], cwd=where.repo, capture_output=True,
                          text=True)
    if proc.returncode:
        log.warning("dvc exp pull %s %s failed: %s", where.remote, experiment,
                    (proc.stderr or proc.stdout).strip().splitlines()[-1:] or "")

