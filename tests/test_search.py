"""`python -m stages.search` end to end on the offline profile: trials on local Dask workers and on "other machines"
(Dask workers that reach the baseline only through a bare git remote and a DVC remote, with the study in a real
PostgreSQL server), pruning from the validation loss, a worker killed mid-trial, and Ctrl-C then the same command."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from benchmarks.harness.dvc_queue import experiments_shown
from conftest import dvc_env, git, run_dvc, snapshot

pytestmark = pytest.mark.slow
# Two trials: one round on two workers (every combination of a grid is tested in test_search_space.py)
GRID = ["--grid", "lora.r=4,8", "--grid", "training.learning_rate=0.002"]
QUIET = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}  # two trials share 2 cores


@pytest.fixture(scope="module")
def baseline(short_run: Path) -> Path:
    """The short offline run, committed with its outputs: what a search starts from."""
    return short_run


def search(repo: Path, *args: str, wait: bool = True) -> subprocess.CompletedProcess | subprocess.Popen:
    cmd = [sys.executable, "-m", "stages.search", *args]
    env = dvc_env(repo, **QUIET)
    if not wait:
        return subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)


def trials(storage: str, name: str) -> list:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    except KeyError:  # the command has made the database but not yet the study
        return []


def shown(repo: Path) -> dict[str, dict]:
    return {e["name"]: e for e in experiments_shown(json.loads(run_dvc(repo, "exp", "show", "--json").stdout))}


def check_experiments(repo: Path, storage: str, name: str, count: int) -> dict[str, dict]:
    """Every finished trial is an experiment of the baseline with its params and its objective's value."""
    done = [t for t in trials(storage, name) if t.state.name == "COMPLETE"]
    assert len(done) == count
    exps = shown(repo)
    for t in done:
        exp = exps[f"{name}-{t.number}"]
        assert exp["params"]["lora"]["r"] == t.params["lora.r"]
        assert exp["params"]["training"]["learning_rate"] == t.params["training.learning_rate"]
        assert exp["metrics"]["metrics/compare.json"]["rougeL"]["tuned"] == t.value
        assert exp["metrics"]["metrics/train.json"]["train_loss"] > 0
    losses = {exps[f"{name}-{t.number}"]["metrics"]["metrics/train.json"]["train_loss"] for t in done}
    assert len(losses) == count  # each trained with its own params
    return exps


def leaderboard_trials(stdout: str) -> list[int]:
    return [int(line.split("|")[1]) for line in stdout.splitlines() if line.startswith("| ") and "trial" not in line]


def test_a_grid_on_two_local_workers_is_one_experiment_per_trial_and_leaves_the_workspace(baseline):
    before = snapshot(baseline)
    proc = search(baseline, *GRID, "--workers", "2", "--name", "grid")
    assert proc.returncode == 0, proc.stderr[-3000:]
    storage = f"sqlite:///{baseline / '.search/grid.db'}"
    check_experiments(baseline, storage, "grid", 2)
    done = sorted((t for t in trials(storage, "grid")), key=lambda t: -t.value)
    assert leaderboard_trials(proc.stdout) == [t.number for t in done]  # best first
    assert f"dvc exp apply grid-{done[0].number}" in proc.stdout.splitlines()[-1]
    assert {(t.params["lora.r"], t.params["training.learning_rate"]) for t in done} == {(4, 0.002), (8, 0.002)}
    assert re.search(r"trial \d: step \d/8", proc.stderr) and "of 2 trials finished" in proc.stderr  # progress
    assert snapshot(baseline) == before and git(baseline, "status", "--porcelain") == ""
    assert (baseline / ".search/grid/leaderboard.md").read_text().strip() in proc.stdout

    again = search(baseline, *GRID, "--workers", "2", "--name", "grid")  # a finished study runs nothing
    assert again.returncode == 0 and "2 of 2 trials finished" in again.stderr and "starts" not in again.stderr
    (baseline / ".search/grid.db").unlink()  # a study gone, its experiments kept: they are not overwritten
    lost = search(baseline, *GRID, "--name", "grid")
    assert lost.returncode == 1 and lost.stderr.strip().splitlines()[-1].startswith(
        "error: experiments grid-0, grid-1 already exist here"), lost.stderr


def test_a_pruned_trial_stops_early_and_ctrl_c_leaves_a_study_the_same_command_continues(baseline, tmp_path):
    spec = tmp_path / "prune.yaml"
    spec.write_text("sampler: random\npruner: median\nstartup_trials: 1\ntrials: 3\n"
                    "start_with: [{training.learning_rate: 0.003}, {training.learning_rate: 1.0e-7},"
                    " {training.learning_rate: 0.006}]\n"
                    "space: {training.learning_rate: {low: 1.0e-7, high: 0.01, log: true}}\n")
    storage = f"sqlite:///{baseline / '.search/prune.db'}"
    driver = search(baseline, str(spec), wait=False)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # Ctrl-C once the third trial is training
        # Read the study only once a trial has started: the command has then made the database and its tables
        # (opening it earlier would race the command to create them).
        running = [t for t in trials(storage, "prune") if t.number == 2 and t.state.name == "RUNNING"] \
            if (baseline / ".search/prune/trial-0.log").exists() else []
        if running and running[0].user_attrs.get("progress", [0])[0] >= 2:
            break
        assert driver.poll() is None, driver.communicate()
        time.sleep(1)
    driver.send_signal(signal.SIGINT)
    out, err = driver.communicate(timeout=180)
    assert driver.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("error: interrupted") and "run the same command to continue" in err
    first = {t.number: t for t in trials(storage, "prune")}
    assert first[0].state.name == "COMPLETE"
    assert first[1].state.name == "PRUNED" and first[1].user_attrs["step"] == 2  # its first validation, of 8 steps
    assert first[1].user_attrs["stopped_at"] < 8  # the training did not reach its last step
    # intermediate values are minus the validation loss (the objective is maximised): 1e-7 trails 0.003 at step 2
    assert first[1].intermediate_values[2] < first[0].intermediate_values[2] < 0
    assert first[2].state.name == "FAIL" and first[2].user_attrs["interrupted"]
    assert first[3].state.name == "WAITING"  # queued again with the interrupted trial's params
    assert not subprocess.run(["pgrep", "-f", "dvc exp run -n prune-2"], capture_output=True).stdout  # all stopped

    proc = search(baseline, str(spec))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count(" starts: ") == 1  # only the interrupted trial runs again
    final = {t.number: t for t in trials(storage, "prune")}
    assert len(final) == 4 and final[3].state.name == "COMPLETE"
    assert final[3].params == {"training.learning_rate": 0.006}
    exps = shown(baseline)
    assert {"prune-0", "prune-3"} <= set(exps) and not {"prune-1", "prune-2"} & set(exps)
    assert leaderboard_trials(proc.stdout)[-2:] == [1, 2]  # pruned, then interrupted, after the finished ones


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres():
    """A PostgreSQL server of its own, from a temporary data folder on a free port; stopped after."""
    found = shutil.which("initdb") or next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))), None)
    assert found, "PostgreSQL's initdb is missing: apt-get install postgresql (.ci/run does)"
    bindir, data, port = Path(found).parent, Path(tempfile.mkdtemp(prefix="pg-")), free_port()
    as_user = []
    if os.geteuid() == 0:  # initdb refuses root: the server runs as the user Debian's package made for it
        shutil.chown(data, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    run = [*as_user, str(bindir / "pg_ctl"), "-D", str(data / "db"), "-l", str(data / "log")]
    subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data / "db"), "-U", "postgres", "--auth=trust"],
                   check=True, capture_output=True)
    subprocess.run([*run, "-w", "-o", f"-p {port} -k {data} -c listen_addresses=127.0.0.1", "start"], check=True,
                   capture_output=True)
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*run, "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


def test_trials_on_two_machines_reach_the_baseline_through_remotes_and_survive_a_killed_worker(
        baseline, tmp_path, postgres, monkeypatch):
    import dask
    from distributed import Client, LocalCluster

    # The remotes, and the user's own clone of them (what `git clone` + `dvc pull` give a user)
    bare, outputs, user = tmp_path / "remote.git", tmp_path / "dvc-remote", tmp_path / "user"
    git(tmp_path, "clone", "--quiet", "--bare", str(baseline), str(bare))
    git(tmp_path, "clone", "--quiet", str(bare), str(user))
    env = dvc_env(user, **QUIET)
    run_dvc(user, "remote", "add", "--default", "shared", str(outputs), env=env)
    git(user, "commit", "-qam", "the team's DVC remote")
    git(user, "push", "--quiet", "origin", "HEAD")
    run_dvc(baseline, "remote", "add", "--local", "--force", "team", str(outputs), env=env)
    run_dvc(baseline, "push", "--quiet", "--remote", "team", env=env)  # the baseline's outputs, as its author did
    run_dvc(user, "pull", "--quiet", env=env)

    for key, value in {**QUIET, **{k: v for k, v in env.items() if k.startswith("GIT_")}}.items():
        monkeypatch.setenv(key, value)  # the workers' environment, as on the machines a cluster runs on
    with dask.config.set({"distributed.scheduler.allowed-failures": 1}), \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        driver = search(user, *GRID, "--name", "team", "--scheduler", cluster.scheduler_address,
                        "--storage", postgres, "--remote", "origin", wait=False)
        killed = None
        deadline = time.monotonic() + 400
        while killed is None and time.monotonic() < deadline:  # kill the worker under a training trial
            assert driver.poll() is None, driver.communicate()
            busy = {addr: keys for addr, keys in client.processing().items() if keys}
            # A trial on a worker: the command has made the study's tables, so reading them races nothing.
            training = [t for t in trials(postgres, "team") if t.state.name == "RUNNING"
                        and t.user_attrs.get("progress", [0])[0] >= 2] if busy else []
            if training and busy:
                worker, keys = next(iter(busy.items()))
                killed = int(str(next(iter(keys))).split("-")[1])  # keys are team-<trial>-<nonce>
                os.kill(client.run(os.getpid, workers=[worker])[worker], signal.SIGKILL)
            time.sleep(1)
        out, err = driver.communicate(timeout=600)
        assert driver.returncode == 0, err[-3000:]
    assert killed is not None
    assert f"trial {killed} complete" in err  # run again once, after its worker died under it
    assert not subprocess.run(["pgrep", "-f", "dvc exp run -n team-"], capture_output=True).stdout  # none left
    exps = check_experiments(user, postgres, "team", 2)  # pulled back from the git and DVC remotes
    best = leaderboard_trials(out)[0]
    run_dvc(user, "exp", "apply", f"team-{best}", env=env)  # the best trial, outputs and all, from the DVC remote
    applied = json.loads((user / "metrics/compare.json").read_text())
    assert applied["rougeL"]["tuned"] == exps[f"team-{best}"]["metrics"]["metrics/compare.json"]["rougeL"]["tuned"]
    assert (user / "models/adapter/adapter_model.safetensors").is_file()

