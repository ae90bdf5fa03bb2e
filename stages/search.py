"""Search params.yaml's hyperparameters: Optuna picks each trial's values and prunes poor ones from their validation
loss, Dask runs the trials (every GPU here, or any Dask cluster), and every trial is a DVC experiment.

    python -m stages.search search.yaml                       # the search defined there (docs/search.md)
    python -m stages.search --grid lora.r=8,16,32 --grid training.learning_rate=1e-4,2e-4,4e-4
    python -m stages.search search.yaml --scheduler tcp://host:8786 --storage postgresql://user@db/search \
        --remote origin                                       # trials on other machines, through the git remote

Trials start from the last commit: each in a clone of it (under .dvc/tmp/search/, or on the worker's machine),
so the workspace is untouched. A finished trial is an experiment of that commit (`dvc exp show`), named
<study>-<trial>; the leaderboard ends with the best one to `dvc exp apply`. The study (SQLite under .search/
unless --storage) keeps every trial: Ctrl-C stops the running ones, and the same command continues the search.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import subprocess
from pathlib import Path

import yaml

from samsum_qlora.errors import PipelineError, run_stage
from samsum_qlora.files import atomic_file
from samsum_qlora.search import leaderboard
from samsum_qlora.search.cluster import dask_client
from samsum_qlora.search.driver import Where, run_trials
from samsum_qlora.search.space import check_space, load_spec
from samsum_qlora.search.study import finished_count, open_study, quiet_optuna, requeue_unfinished

log = logging.getLogger(__name__)


def git(*args: str) -> str:
    proc = subprocess.run(["git", *args], capture_output=True, text=True)
    if proc.returncode:
        said = (proc.stderr or proc.stdout).strip().splitlines()
        raise PipelineError(f"git {' '.join(args)} failed: {said[-1] if said else f'exit code {proc.returncode}'}")
    return proc.stdout.strip()


def committed(path: str) -> str | None:
    proc = subprocess.run(["git", "show", f"HEAD:{path}"], capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else None


def where_trials_run(repo: Path, name: str, storage: str, remote: str | None) -> Where:
    baseline = git("rev-parse", "HEAD")
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    changed = [line[3:] for line in status.stdout.splitlines() if line.strip()]
    if changed:
        log.warning("trials start from commit %s; uncommitted changes are not part of the search: %s",
                    baseline[:8], ", ".join(changed[:5]) + (" ..." if len(changed) > 5 else ""))
    log_dir = repo / ".search" / name
    if remote is None:
        cache = subprocess.run(["dvc", "cache", "dir"], capture_output=True, text=True).stdout.strip()
        return Where(repo, str(repo), baseline, cache or str(repo / ".dvc/cache"),
                     str(repo / ".dvc/tmp/search" / name), log_dir, storage, None)
    url = git("remote", "get-url", remote)
    git("fetch", "--quiet", remote)
    if not git("branch", "--remotes", "--contains", baseline):
        raise PipelineError(f"commit {baseline[:8]} is not on the git remote {remote}: git push it (and dvc push "
                            f"its outputs) first, so trials on other machines can start from it")
    return Where(repo, url, baseline, None, None, log_dir, storage, remote)


def earlier_experiments(name: str) -> list[str]:
    """Experiments of this repository named like the trials of a study called `name` (<name>-<number>)."""
    refs = git("for-each-ref", "--format=%(refname)", "refs/exps").splitlines()
    names = sorted({ref.rsplit("/", 1)[-1] for ref in refs})
    return [n for n in names if re.fullmatch(rf"{re.escape(name)}-\d+", n)]


def baseline_peak_gib() -> float | None:
    text = committed("metrics/train.json")
    return json.loads(text).get("peak_memory_gib") if text else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", nargs="?", help="search.yaml: the space, objective, sampler, pruner")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                        help="a grid axis (repeatable); replaces the file's space and sampler")
    parser.add_argument("--name", help="the study's name (default: the file's stem, or 'grid')")
    parser.add_argument("--trials", type=int, help="how many trials (default: search.yaml's, or the whole grid)")
    parser.add_argument("--scheduler", help="a Dask scheduler's address (default: a cluster on this machine)")
    parser.add_argument("--workers", type=int, help="local Dask workers without GPUs (default 1)")
    parser.add_argument("--storage", help="Optuna storage URL (default: sqlite under .search/)")
    parser.add_argument("--remote", help="git remote trials clone from and push to (other machines; "
                                         "its DVC remote is the project's default)")
    args = parser.parse_args(argv)
    try:
        import distributed  # noqa: F401
        import optuna  # noqa: F401
    except ImportError as err:
        raise PipelineError(f"the search needs Optuna and Dask ({err.name} is missing): "
                            f"pip install -e '.[search]'") from None
    repo = Path.cwd()
    if not (repo / "dvc.yaml").is_file() or not (repo / ".git").exists():
        raise PipelineError("run the search from the project's root: a git repository with dvc.yaml")
    spec, where_text = load_spec(args.file, args.grid, args.name)
    if args.trials:
        spec = spec.model_copy(update={"trials": args.trials})
    params_text = committed("params.yaml")
    if params_text is None:
        raise PipelineError("params.yaml is not committed: trials start from the last commit; commit it first")
    check_space(spec, where_text, yaml.safe_load(params_text) or {})
    storage = args.storage or f"sqlite:///{repo / '.search' / (spec.name + '.db')}"
    where = where_trials_run(repo, spec.name, storage, args.remote)
    quiet_optuna()
    where.log_dir.mkdir(parents=True, exist_ok=True)  # the study's SQLite file goes beside it, by default
    study = open_study(spec, storage, where.baseline)
    taken = earlier_experiments(spec.name) if all(t.state.name == "WAITING" for t in study.trials) else []
    if taken:
        raise PipelineError(f"experiments {', '.join(taken[:3])} already exist here, from an earlier search named "
                            f"{spec.name!r} whose study is gone; give this one another name (--name), or remove "
                            f"them (dvc exp remove {' '.join(taken[:3])})")
    if requeue_unfinished(study):
        log.info("trials the last run left unfinished run again first")
    total = spec.trial_count()
    log.info("study %s: %d of %d trials finished; %s sampler, %s pruner, objective %s (%s)", spec.name,
             finished_count(study), total, spec.sampler, spec.pruner, spec.objective, spec.direction)
    finished = True
    if finished_count(study) < total:
        with dask_client(args.scheduler, args.workers, spec.workers_per_gpu, baseline_peak_gib()) as client:
            finished = run_trials(study, spec, where, client)
    board = leaderboard.rows(study, spec.direction == "maximize")
    text = leaderboard.table(board, spec.objective)
    with atomic_file(where.log_dir / "leaderboard.md") as f:
        f.write(text + "\n")
    print(text)
    print(leaderboard.best_line(board, spec.objective))
    if not finished:
        raise KeyboardInterrupt


if __name__ == "__main__":
    run_stage(main, on_interrupt=lambda: "finished trials are kept in the study; run the same command to continue")
