"""kill -9 in the middle of `train`, then `dvc repro`: training resumes from the last checkpoint and ends where an
uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import dvc_env, make_project, offline_params, run_dvc

pytestmark = pytest.mark.slow

TRAIN = {"max_steps": 24, "save_steps": 8, "eval_steps": 8, "logging_steps": 4}


def train_metrics(repo: Path) -> dict:
    """The train stage's metrics and the facts of its run (steps, the step it resumed from)."""
    return {**json.loads((repo / "metrics/train.json").read_text()),
            **json.loads((repo / "metrics/train_run.json").read_text())}


def test_killed_training_resumes_under_dvc_and_matches_an_uninterrupted_run(tmp_path):
    params = offline_params(training=TRAIN)
    whole = make_project(tmp_path / "whole", params)
    run_dvc(whole, "repro", "train")

    repo = make_project(tmp_path / "killed", params)
    run_dvc(repo, "repro", "tokenize_mask")
    proc = subprocess.Popen(["dvc", "repro", "train"], cwd=repo, env=dvc_env(repo), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = repo / "models/checkpoints/checkpoint-8/trainer_state.json"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "train ended before it could be interrupted"
    time.sleep(1)  # let the checkpoint's files land
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (repo / "metrics/train.json").exists() and not (repo / "models/adapter").exists()

    out = run_dvc(repo, "repro", "train").stdout
    assert "Running stage 'train'" in out and "Running stage 'prepare'" not in out
    resumed, reference = train_metrics(repo), train_metrics(whole)
    assert resumed["resumed_from_step"] >= 8 and resumed["steps"] == reference["steps"] == 24
    assert resumed["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-3)
    assert resumed["eval_loss"] == pytest.approx(reference["eval_loss"], rel=1e-3)
    assert (repo / "models/adapter/adapter_model.safetensors").is_file()
    assert run_dvc(repo, "status", "train").stdout.strip().endswith("Data and pipelines are up to date.")
