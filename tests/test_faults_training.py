"""Non-finite numbers: refused in params.yaml, stopping a diverged run with one line, and never written as JSON."""

import ast
import json
import math

import pytest
import yaml

from conftest import ROOT, stage_error_line, tokenized_project
from samsum_qlora.errors import PipelineError
from samsum_qlora.files import finite_or_none, write_json
from samsum_qlora.params import parse_params

SCANNED = ("samsum_qlora", "stages", "offline", "benchmarks")


@pytest.mark.parametrize(("raw", "message"), [
    ({"training": {"learning_rate": float("inf")}}, "training.learning_rate is inf; expected a finite number > 0"),
    ({"training": {"learning_rate": "inf"}}, "training.learning_rate is inf; expected a finite number > 0"),
    ({"training": {"learning_rate": "-Infinity"}}, "training.learning_rate is -inf; expected a finite number > 0"),
    ({"lora": {"lora_dropout": float("nan")}}, "lora.lora_dropout is nan; expected a finite number in [0, 1)"),
    ({"training": {"max_memory_gib": "nan"}}, "training.max_memory_gib is nan; expected null (the GPU's memory) "
                                              "or a finite number of GiB > 1 (e.g. 16)"),
    ({"eval": {"max_memory_gib": float("-inf")}}, "eval.max_memory_gib is -inf; expected null (the GPU's memory) "
                                                  "or a finite number of GiB > 1 (e.g. 16)"),
])
def test_every_number_refuses_inf_and_nan(raw, message):
    """YAML's .inf/.nan and the CLI's `-S key=inf` (a string the schema reads as a number) are both refused."""
    with pytest.raises(PipelineError) as err:
        parse_params(raw)
    assert str(err.value) == f"params.yaml: {message}"


def test_an_inf_learning_rate_in_params_yaml_stops_the_stage_before_anything_runs(tmp_path, monkeypatch, capsys):
    from samsum_qlora import errors
    from stages import train

    (tmp_path / "params.yaml").write_text("training:\n  learning_rate: .inf\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        errors.run_stage(train.main)
    assert stopped.value.code == 1
    stderr = capsys.readouterr().err
    assert stderr.strip() == "error: params.yaml: training.learning_rate is inf; expected a finite number > 0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing ran, nothing was written


def test_write_json_refuses_nan_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "metrics.json"
    write_json(path, {"eval_loss": 1.5})
    with pytest.raises(ValueError, match="Out of range float"):
        write_json(path, {"eval_loss": float("nan")})
    assert json.loads(path.read_text()) == {"eval_loss": 1.5} and [p.name for p in tmp_path.iterdir()] == [path.name]
    write_json(path, finite_or_none({"eval_loss": float("nan"), "curve": [1.0, float("inf")], "steps": 3}))
    assert json.loads(path.read_text()) == {"eval_loss": None, "curve": [1.0, None], "steps": 3}


def test_every_json_writer_refuses_nan():
    """Each json.dump/json.dumps in the project passes allow_nan=False: no file it writes holds NaN or Infinity,
    which JSON does not have (DVC, jq and browsers reject them)."""
    calls = 0
    for path in sorted(p for folder in SCANNED for p in (ROOT / folder).rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("dump", "dumps") and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "json"):
                calls += 1
                allow = [kw.value for kw in node.keywords if kw.arg == "allow_nan"]
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                assert allow and isinstance(allow[0], ast.Constant) and allow[0].value is False, (
                    f"json.{node.func.attr} without allow_nan=False at {where}")
    assert calls > 10


@pytest.mark.slow
def test_a_loss_that_turns_nan_stops_training_with_one_line(tmp_path, monkeypatch, capsys):
    """From step 3 on the loss is NaN (so are the gradients, and the weights after the update): with
    nonfinite_patience 2 the run stops at step 4, before that step's checkpoint, with one line naming the step and
    the last finite checkpoint; no adapter is written and metrics/train.json keeps the previous run's."""
    import torch

    from samsum_qlora.training import trainer as trainer_module
    from stages import train

    tokenized_project(tmp_path, max_steps=5, save_steps=2, eval_steps=100, nonfinite_patience=2)
    metrics = tmp_path / "metrics/train.json"
    metrics.parent.mkdir(exist_ok=True)
    metrics.write_text('{"train_loss": 1.0}\n')  # a previous run's
    original, calls = trainer_module.summary_loss, []

    def diverging(outputs, labels, num_items_in_batch=None):
        loss = original(outputs, labels, num_items_in_batch)
        calls.append(1)  # one pass per step here: batch 4, no accumulation, under the token cap
        return loss * torch.tensor(math.nan) if len(calls) >= 3 else loss

    monkeypatch.setattr(trainer_module, "summary_loss", diverging)
    monkeypatch.chdir(tmp_path)
    message = stage_error_line(capsys, train.main)
    assert message == (
        "error: training stopped at step 4: the logged loss and grad_norm were not finite on 2 logged step(s) in a "
        "row (training.nonfinite_patience); likely causes: training.learning_rate too high, fp16 overflow, or bad "
        "rows in the data; no adapter was saved and the last finite checkpoint models/checkpoints/checkpoint-2 is "
        "kept; lower training.learning_rate or fix the data, then run `dvc repro train` again")
    assert sorted(p.name for p in (tmp_path / "models/checkpoints").iterdir()) == ["checkpoint-2", "run.json"]
    assert not (tmp_path / "models/adapter").exists()
    assert metrics.read_text() == '{"train_loss": 1.0}\n'
    assert yaml.safe_load((tmp_path / "params.yaml").read_text())["training"]["nonfinite_patience"] == 2


def test_non_finite_adapter_weights_are_never_saved():
    import torch

    from samsum_qlora.training.guards import check_finite_weights

    model = torch.nn.Linear(2, 2)
    model.bias.requires_grad_(False)
    check_finite_weights(model)
    with torch.no_grad():
        model.weight[0, 1] = math.inf
    with pytest.raises(PipelineError, match=r"^the trained adapter weight weight is not finite \(inf/NaN\);"):
        check_finite_weights(model)


def test_the_guard_waits_for_patience_and_skips_the_save_of_a_non_finite_step():
    from transformers import TrainerControl, TrainerState

    from samsum_qlora.training.guards import NonFiniteGuard

    guard, state = NonFiniteGuard(patience=2), TrainerState()
    for step, loss, stop in ((1, 2.0, False), (2, math.nan, False), (3, 1.9, False), (4, math.inf, False),
                             (5, math.nan, True)):
        state.global_step, control = step, TrainerControl(should_save=True)
        guard.on_log(None, state, control, logs={"loss": loss, "grad_norm": 0.5})
        guard.on_log(None, state, control, logs={"eval_loss": 1.0})  # an evaluation's log counts for nothing
        assert (control.should_training_stop, control.should_save) == (stop, math.isfinite(loss))
    assert guard.stopped_at == (5, ["loss"])
