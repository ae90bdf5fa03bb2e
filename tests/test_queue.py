"""Experiments queued and run side by side by DVC's own queue (the celery workers `dvc queue start` launches)."""

from __future__ import annotations

import json
import shlex
import subprocess
import time
from pathlib import Path

import pytest

from benchmarks.harness.dvc_queue import experiments_shown, start_queue, wait_for_queue
from conftest import ROOT, dvc_env, git, run_dvc, snapshot

pytestmark = pytest.mark.slow
GOOD = {"r4": ["-S", "lora.r=4"], "r16": ["-S", "lora.r=16"]}
BAD = ["-S", "model.base_model=offline/no-such-model"]  # tokenize_mask stops: the folder does not exist
def readme_short_view() -> list[str]:
    """The README's recommended `dvc exp show` command (of its quick-start), as arguments."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    line = next(line for line in text.splitlines() if line.startswith("dvc exp show --no-pager"))
    return shlex.split(line.split(" #", 1)[0])


def train_facts(repo: Path, rev: str) -> dict:
    """Steps and parameter counts of the train stage at `rev` (metrics/train_run.json, or train.json before it)."""
    for name in ("metrics/train_run.json", "metrics/train.json"):
        try:
            return json.loads(git(repo, "show", f"{rev}:{name}"))
        except subprocess.CalledProcessError:
            continue
    raise AssertionError(f"{rev} has neither metrics/train_run.json nor metrics/train.json")


def test_queue_runs_two_experiments_at_once_reports_the_failed_one_and_leaves_the_workspace(short_run, tmp_path,
                                                                                              monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two runs share the runner's cores; more threads only thrash
    repo = short_run
    env = dvc_env(repo)
    before = snapshot(repo)
    assert before["dvc.lock"] and any(name.startswith("models/adapter/") for name in before)

    names = {}
    for label, args in [*GOOD.items(), ("bad", BAD)]:
        out = run_dvc(repo, "exp", "run", "--queue", *args, env=env).stdout
        names[label] = out.split("Queued experiment '")[1].split("'")[0]
    started = time.time()
    start_queue(repo, env, 2, tmp_path / "queue.log")
    try:
        final, _, emptied = wait_for_queue(repo, env, timeout=240, started=started, poll=3)
    finally:
        run_dvc(repo, "queue", "stop", env=env, check=False)
    assert emptied, final
    status = {row["name"]: row["status"] for row in final}
    assert status == {names["r4"]: "Success", names["r16"]: "Success", names["bad"]: "Failed"}, status

    # The workspace is where it was: the queue ran everything in its own temporary copies.
    assert snapshot(repo) == before
    assert git(repo, "status", "--porcelain") == ""

    # The README's short view of `dvc exp show` still fits a 160-column terminal after a queue, failed run included,
    # and shows what runs are compared by.
    table = run_dvc(repo, *readme_short_view()[1:], env={**env, "COLUMNS": "400"}).stdout.splitlines()
    assert max(map(len, table)) <= 160, "\n".join(table)
    header = next(line for line in table if "Experiment" in line).split()
    assert {"train_loss", "eval_loss", "rougeL.tuned", "rougeL.gain", "lora.r"} <= set(header), header
    assert all(any(name in line for line in table) for name in names.values())

    shown = {e["name"]: e for e in experiments_shown(json.loads(run_dvc(repo, "exp", "show", "--json").stdout))}
    assert shown[names["bad"]]["state"] == "failed"
    good = {label: shown[names[label]] for label in GOOD}
    assert {label: e["state"] for label, e in good.items()} == {"r4": "success", "r16": "success"}
    assert (good["r4"]["params"]["lora"]["r"], good["r16"]["params"]["lora"]["r"]) == (4, 16)
    train = {label: e["metrics"]["metrics/train.json"] for label, e in good.items()}
    facts = {label: train_facts(repo, e["rev"]) for label, e in good.items()}  # committed with each experiment
    assert facts["r4"]["steps"] == facts["r16"]["steps"] == 8
    assert facts["r16"]["trainable_params"] == 4 * facts["r4"]["trainable_params"]  # LoRA's size grows with r
    assert train["r4"]["train_loss"] != train["r16"]["train_loss"]
    assert train["r4"]["train_loss"] != json.loads(before["metrics/train.json"])["train_loss"]  # not the base's

    # And they are what each would have given alone: training again with r 4, now in the workspace, one run at a
    # time, gives the queued run's losses exactly (forced: the run cache would only restore the queued result).
    run_dvc(repo, "exp", "run", "--force", "--single-item", "-S", "lora.r=4", "train", env=env)
    alone = json.loads((repo / "metrics/train.json").read_text())
    assert (alone["train_loss"], alone["eval_loss"]) == (train["r4"]["train_loss"], train["r4"]["eval_loss"])
