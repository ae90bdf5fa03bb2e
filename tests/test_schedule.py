"""The training schedule: warmup as a share of the run, the plan line at the start of training, and the warning
when the plan cannot train well (few steps, warmup over half the run, epochs shorter than the curves' interval)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from transformers import TrainingArguments

from conftest import run_module, tokenized_project
from samsum_qlora.params import TrainingParams, parse_params
from samsum_qlora.training.schedule import schedule_warnings, warmup_setting


def warmup_of(training: TrainingParams, total_steps: int) -> int:
    """The warmup steps transformers' Trainer takes from the setting, for a run of `total_steps`."""
    return TrainingArguments(output_dir="unused", warmup_steps=warmup_setting(training)).get_warmup_steps(total_steps)


def test_the_default_job_keeps_its_50_warmup_steps_and_a_small_run_a_small_share():
    default = TrainingParams()
    assert warmup_of(default, 921) == 50  # SAMSum's 14,732 rows at 16 per step: ceil(0.054 x 921) = ceil(49.7)
    assert warmup_of(default, 44) == 3  # 700 rows: ceil(0.054 x 44) = ceil(2.4), not the 50 that outlast the run
    assert warmup_of(dataclasses.replace(default, warmup_steps=7), 921) == 7  # steps, when set, win
    assert warmup_of(dataclasses.replace(default, warmup_steps=0), 921) == 0
    assert warmup_of(dataclasses.replace(default, warmup_ratio=0.0), 921) == 0


@pytest.mark.parametrize("ratio", [1.0, 1.5, -0.1, float("nan")])
def test_a_ratio_outside_0_to_1_is_refused(ratio):
    with pytest.raises(Exception, match="training.warmup_ratio"):
        parse_params({"training": {"warmup_ratio": ratio}})


def test_a_sound_schedule_has_no_warning():
    assert schedule_warnings(TrainingParams(), steps_per_epoch=921, total_steps=921, warmup_steps=50,
                             evaluates=True) == []


def test_each_degenerate_plan_is_named_with_the_param_to_change():
    t = TrainingParams()  # logging every 10 steps, validation every 100
    (warmup, few) = schedule_warnings(t, steps_per_epoch=200, total_steps=44, warmup_steps=50, evaluates=False)
    assert warmup.startswith("warmup takes 50 of the run's 44 steps, so the learning rate is at its peak for none")
    assert "training.warmup_steps" in warmup
    assert few.startswith("only 44 optimizer steps (fewer than 100)") and "training.num_train_epochs" in few

    (half,) = schedule_warnings(t, steps_per_epoch=100, total_steps=300, warmup_steps=150, evaluates=False)
    assert "at its peak for less than half of it" in half

    (short,) = schedule_warnings(t, steps_per_epoch=40, total_steps=200, warmup_steps=10, evaluates=True)
    assert short.startswith("an epoch is 40 steps, shorter than training.eval_steps=100")
    assert schedule_warnings(t, steps_per_epoch=40, total_steps=200, warmup_steps=10, evaluates=False) == []
    (both,) = schedule_warnings(t, steps_per_epoch=8, total_steps=160, warmup_steps=1, evaluates=True)
    assert "shorter than training.logging_steps=10 and training.eval_steps=100" in both


def test_a_small_run_says_its_plan_and_warns_once_in_the_log_the_run_file_and_the_card(tmp_path):
    # 48 rows, 4 per step: 12 steps per epoch; one epoch with the offline profile's 10 warmup steps.
    tokenized_project(tmp_path, max_steps=-1, num_train_epochs=1.0, warmup_steps=10, eval_steps=3)

    proc = run_module(tmp_path, "stages.train")

    line = ("schedule: 48 examples, 4 per optimizer step: 12 steps per epoch, 12 steps (1 epochs), warmup 10 steps, "
            "peak learning rate 0.002")
    assert proc.stderr.count(line) == 1, proc.stderr[-3000:]
    warned = [row for row in proc.stderr.splitlines() if "the schedule is unlikely to train well" in row]
    assert len(warned) == 1
    assert "warmup takes 10 of the run's 12 steps" in warned[0] and "only 12 optimizer steps" in warned[0]
    run = json.loads((tmp_path / "metrics/train_run.json").read_text())
    assert run["steps"] == run["schedule"]["total_steps"] == 12  # the plan is the Trainer's own count
    assert run["schedule"]["warmup_steps"] == 10 and run["schedule"]["steps_per_epoch"] == 12
    assert [w.split(":")[0] for w in run["schedule"]["warnings"]] == [
        "warmup takes 10 of the run's 12 steps, so the learning rate is at its peak for less than half of it",
        "only 12 optimizer steps (fewer than 100)"]
