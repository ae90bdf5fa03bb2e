"""training.num_processes on a machine without a GPU: two gloo processes launched by accelerate train and evaluate
as one process does, and a run that loses a process stops whole and resumes."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import complete_checkpoint, dvc_env, make_project, offline_params, run_dvc
from samsum_qlora.training.checkpoints import interrupted_advice, last_checkpoint, resume_advice

pytestmark = pytest.mark.slow

# Small enough for a few seconds per run; 8 validation rows in batches of 3 leave a short last batch, which the
# Trainer's own evaluation would pad with repeated rows on two processes.
DATA = {"train_samples": 64, "validation_samples": 8, "test_samples": 12}
TRAIN = {"max_steps": 6, "logging_steps": 1, "save_steps": 3, "eval_steps": 3, "per_device_train_batch_size": 8,
         "per_device_eval_batch_size": 4}
# LoRA dropout draws other random numbers in each process (as on one process with other shapes): without it, one
# and two processes must compute the same losses and updates up to float rounding.
NO_DROPOUT = {"lora_dropout": 0.0}


def stage(repo: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", *args], cwd=repo, env=dvc_env(repo), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A project with its data prepared and tokenized, copied by each test."""
    repo = make_project(tmp_path_factory.mktemp("prepared") / "repo", offline_params(data=DATA))
    stage(repo, "stages.prepare")
    stage(repo, "stages.tokenize_mask")
    return repo


def project_with(prepared: Path, dest: Path, **sections: dict) -> Path:
    shutil.copytree(prepared, dest, symlinks=True)
    (dest / "params.yaml").write_text(json.dumps(offline_params(data=DATA, **sections)))  # JSON is YAML
    return dest


def step_losses(repo: Path) -> dict[int, float]:
    with open(repo / "metrics/curves/plots/metrics/loss.tsv") as f:
        return {int(row["step"]): float(row["loss"]) for row in csv.DictReader(f, delimiter="\t")}


@pytest.mark.parametrize("layout", [
    # packed rows, summary-only logits, and shares (~410 tokens) cut into passes of at most 400 tokens (in some
    # steps one process cuts its share and the other does not: gradients must still be exchanged once per step)
    {"padding_free": True, "max_tokens_per_micro_batch": 400},
    {"padding_free": False, "max_tokens_per_micro_batch": None},  # padded rows, one pass each
], ids=["packed-and-split", "padded"])
def test_two_processes_train_as_one(prepared, tmp_path, layout):
    runs = {}
    for n in (1, 2):
        repo = project_with(prepared, tmp_path / f"n{n}", training={**TRAIN, **layout, "num_processes": n},
                            lora=NO_DROPOUT)
        out = stage(repo, "stages.train")
        runs[n] = repo
        if n == 2:
            assert "training: starting 2 processes (accelerate launch)" in out.stderr
            assert out.stderr.count("device: no CUDA device") == 1  # the second process logs warnings only
    one, two = runs[1], runs[2]
    # Per-step losses: the mean over each step's summary tokens of both processes, as one process computes it.
    losses_one, losses_two = step_losses(one), step_losses(two)
    assert sorted(losses_one) == sorted(losses_two) == list(range(1, 7))
    for step, loss in losses_one.items():
        assert losses_two[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), step
    metrics_one, metrics_two = (json.loads((r / "metrics/train.json").read_text()) for r in (one, two))
    assert metrics_two["eval_loss"] == pytest.approx(metrics_one["eval_loss"], rel=1e-5)
    facts_one, facts_two = (json.loads((r / "metrics/train_run.json").read_text()) for r in (one, two))
    assert (facts_one["num_processes"], facts_two["num_processes"]) == (1, 2)
    assert facts_two["train_tokens"] == facts_one["train_tokens"]  # all processes' tokens, counted once
    assert len(facts_two["peak_memory_gib_per_process"]) == 2
    assert metrics_two["peak_memory_gib"] == max(facts_two["peak_memory_gib_per_process"])
    if layout["max_tokens_per_micro_batch"]:
        assert facts_two["micro_batches"] > 2 * 6  # some shares were cut into several passes
    # The adapters: the same weights after six updates, up to float rounding.
    weights_one, weights_two = (load_file(r / "models/adapter/adapter_model.safetensors") for r in (one, two))
    assert weights_one.keys() == weights_two.keys()
    for name, tensor in weights_one.items():
        difference = (weights_two[name] - tensor).abs().max().item()
        assert difference <= 1e-5 * max(1.0, tensor.abs().max().item()), (name, difference)
    # Checkpoints are written once, by the first process, with both processes' random states.
    checkpoint = one / "models/checkpoints/checkpoint-6"
    assert (checkpoint / "rng_state.pth").is_file()
    files = sorted(p.name for p in (two / "models/checkpoints/checkpoint-6").iterdir())
    assert "rng_state_0.pth" in files and "rng_state_1.pth" in files and "adapter_model.safetensors" in files


def test_two_process_evaluation_writes_the_same_bytes(prepared, tmp_path):
    outputs = {}
    for n in (1, 2):
        repo = project_with(prepared, tmp_path / f"n{n}", eval={"batch_size": 3, "max_new_tokens": 16},
                            training={"num_processes": n})
        stage(repo, "stages.evaluate", "baseline")
        outputs[n] = repo
        assert not [p.name for p in (repo / "data/predictions").iterdir() if p.name != "baseline.jsonl"]
    one, two = outputs[1], outputs[2]
    # The same batches (four of three prompts), shared between the processes, then merged in the test split's order.
    predictions = "data/predictions/baseline.jsonl"
    assert (two / predictions).read_bytes() == (one / predictions).read_bytes()
    metrics_one, metrics_two = (json.loads((r / "metrics/baseline.json").read_text()) for r in (one, two))
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum", "gen_len_mean", "examples"):
        assert metrics_two[key] == metrics_one[key]
    assert (metrics_one["processes"], metrics_two["processes"]) == (1, 2)


def descendants(root: int) -> dict[int, dict[str, str]]:
    """The environment of every live descendant of process `root`, by pid (the launcher starts its workers in
    sessions of their own, so the tree is followed through parent ids)."""
    parents, environs = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            if fields[0] == "Z":
                continue
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        parents[int(entry.name)] = int(fields[1])
        environs[int(entry.name)] = dict(e.decode(errors="replace").split("=", 1) for e in environ if b"=" in e)
    found, frontier = {}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in found:
                found[pid] = environs[pid]
                frontier.append(pid)
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the worker processes through /proc")
def test_a_killed_process_stops_the_run_which_then_resumes(prepared, tmp_path):
    training = {**TRAIN, "max_steps": 60, "save_steps": 5, "eval_steps": 30, "logging_steps": 5,
                "num_processes": 2}
    repo = project_with(prepared, tmp_path / "repo", training=training)
    proc = subprocess.Popen(["dvc", "repro", "--single-item", "train"], cwd=repo, env=dvc_env(repo),
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoint = repo / "models/checkpoints/checkpoint-5/trainer_state.json"
    deadline = time.monotonic() + 240
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "training ended before a process could be killed"
    workers = {pid: env for pid, env in descendants(proc.pid).items() if env.get("LOCAL_RANK") == "1"
               and "WORLD_SIZE" in env}
    assert len(workers) == 1, workers
    os.kill(next(iter(workers)), signal.SIGKILL)
    every = set(descendants(proc.pid))
    try:
        out, err = proc.communicate(timeout=90)  # nothing hangs: the launcher stops the other process
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("the run hung after one of its processes was killed") from None
    assert proc.returncode != 0
    error = [line for line in err.splitlines() if line.startswith("error: ")]
    assert error and error[0].startswith("error: training stopped: process 1 of 2 was killed by SIGKILL and the "
                                         "others were stopped; the last checkpoint models/checkpoints/checkpoint-")
    assert error[0].endswith("is kept and `dvc repro` resumes from it")
    assert not every & set(descendants(1)), "processes of the run outlived it"
    assert not (repo / "models/adapter").exists() and not (repo / "metrics/train.json").exists()

    run_dvc(repo, "repro", "--single-item", "train")
    facts = json.loads((repo / "metrics/train_run.json").read_text())
    assert facts["resumed_from_step"] >= 5 and facts["steps"] == 60 and facts["num_processes"] == 2
    assert (repo / "models/adapter/adapter_model.safetensors").is_file()


def test_a_checkpoint_cut_off_while_saving_is_passed_over(tmp_path):
    complete_checkpoint(tmp_path / "checkpoint-5")
    (tmp_path / "checkpoint-10").mkdir()  # killed before the Trainer wrote its state, which comes last
    (tmp_path / "checkpoint-10" / "adapter_model.safetensors").write_bytes(b"")
    assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-5")
    assert resume_advice(tmp_path) == (f"the last checkpoint {tmp_path / 'checkpoint-5'} is kept and `dvc repro` "
                                       "resumes from it")
    assert interrupted_advice(tmp_path) == ("run the same command again to resume from the last checkpoint, "
                                            f"{tmp_path / 'checkpoint-5'}")
    assert interrupted_advice(tmp_path / "none").endswith("running the same command again starts over")


def test_bad_process_counts_are_named_with_the_fix(monkeypatch):
    from dataclasses import replace

    import torch

    from samsum_qlora import distributed
    from samsum_qlora.errors import PipelineError
    from samsum_qlora.params import parse_params

    with pytest.raises(PipelineError, match=r"params.yaml: training.num_processes is 0; expected an integer > 0"):
        parse_params({"training": {"num_processes": 0}})
    params = parse_params({"training": {"num_processes": 3}})
    with pytest.raises(PipelineError) as err:
        distributed.check_training_processes(params.training)
    assert str(err.value) == (
        "params.yaml: training.per_device_train_batch_size (16) must divide by training.num_processes (3): each "
        "batch is split evenly between the processes; set it to a multiple of 3")
    distributed.check_training_processes(replace(params.training, per_device_train_batch_size=15))
    # One process per GPU: a machine with one GPU cannot run two (no accelerate config spreads them over machines).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(distributed, "accelerate_config_file", lambda: None)
    with pytest.raises(PipelineError) as err:
        distributed.check_training_processes(parse_params({"training": {"num_processes": 2}}).training)
    assert str(err.value) == ("params.yaml: training.num_processes is 2 but this machine has 1 GPU; set it to at "
                              "most 1 (`dvc exp run -S training.num_processes=1`)")


def test_evaluation_stays_on_this_machine_when_training_spans_several(monkeypatch):
    import torch

    from samsum_qlora import distributed

    monkeypatch.setattr(distributed, "machines", lambda: 1)
    assert distributed.local_processes(4) == 4
    monkeypatch.setattr(distributed, "machines", lambda: 2)  # accelerate's config spreads training over two machines
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert distributed.local_processes(4) == 2 and distributed.local_processes(1) == 1
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert distributed.local_processes(4) == 1
