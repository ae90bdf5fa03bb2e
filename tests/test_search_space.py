"""search.yaml and --grid: what a search accepts, what it refuses (one line naming the key and the fix), how values
reach `dvc exp run -S`, and how the leaderboard ranks trials."""

from __future__ import annotations

import pytest
import yaml

from conftest import ROOT
from samsum_qlora.errors import PipelineError
from samsum_qlora.search import leaderboard
from samsum_qlora.search.space import check_space, dvc_value, grid_spec, load_spec
from samsum_qlora.search.study import distributions, fingerprint, param_value

PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))


def spec_from(tmp_path, text: str):
    path = tmp_path / "search.yaml"
    path.write_text(text, encoding="utf-8")
    return load_spec(path, [], None)


def test_the_grid_flag_is_every_combination_with_numbers_read_as_numbers():
    spec, where = load_spec(None, ["lora.r=8,16,32", "training.learning_rate=1e-4,2e-4"], None)
    assert where == "--grid" and spec.name == "grid" and spec.sampler == "grid"
    assert spec.space == {"lora.r": [8, 16, 32], "training.learning_rate": [1e-4, 2e-4]}
    assert spec.grid_size() == 6 and spec.trial_count() == 6
    lists = grid_spec(["lora.target_modules=[q_proj,v_proj],[q_proj,k_proj,v_proj,o_proj]"], None)["space"]
    assert lists == {"lora.target_modules": [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"]]}
    with pytest.raises(PipelineError, match="--grid 'lora.r': write KEY=V1,V2"):
        grid_spec(["lora.r"], None)
    check_space(spec, where, PARAMS)


def test_the_committed_example_is_valid_and_samples_the_documented_space():
    spec, where = load_spec(ROOT / "search.yaml", [], None)
    check_space(spec, where, PARAMS)
    assert spec.name == "search" and spec.sampler == "tpe" and spec.pruner == "median"
    kinds = {key: type(d).__name__ for key, d in distributions(spec).items()}
    assert kinds == {"lora.r": "CategoricalDistribution", "training.learning_rate": "FloatDistribution"}
    assert distributions(spec)["training.learning_rate"].log


def test_the_benchmarks_tpe_search_is_valid_and_spans_the_grid():
    from benchmarks.harness.search_runs import TPE
    from samsum_qlora.search.space import SearchSpec

    spec = SearchSpec.model_validate({"name": "tpe", **TPE})
    check_space(spec, "TPE", PARAMS)
    grid, _ = load_spec(None, ["lora.r=8,16,32", "training.learning_rate=1e-4,2e-4,4e-4"], None)
    assert spec.space == grid.space and spec.pruner == "halving" and spec.trial_count() == 6


@pytest.mark.parametrize(("text", "says"), [
    ("space: {lora.rank: [4, 8]}", "space key lora.rank is not in params.yaml (keys of lora: r, lora_alpha"),
    ("space: {lora.r: [8, 0]}", "space.lora.r = 0: lora.r is 0"),
    ("space: {training.learning_rate: {low: 0.001, high: 0.0001}}", "needs finite low < high"),
    ("space: {training.learning_rate: {low: 0, high: 0.1, log: true}}", "a log range needs low > 0"),
    ("sampler: grid\nspace: {training.learning_rate: {low: 0.0001, high: 0.001}}",
     "the grid sampler needs lists of values, but training.learning_rate is a range"),
    ("space: {}", "space is empty"),
    ("name: a/b\nspace: {lora.r: [4]}", "name 'a/b' must be letters, digits"),
    ("sampler: annealing\nspace: {lora.r: [4]}", "sampler: Input should be 'grid', 'random' or 'tpe'"),
    ("space: {lora.r: [4, 8]}\nstart_with: [{seed: 1}]", "must give a value for each key of space: lora.r"),
])
def test_a_bad_search_file_is_one_line_naming_the_key(tmp_path, text, says):
    with pytest.raises(PipelineError) as err:
        spec, where = spec_from(tmp_path, text)
        check_space(spec, where, PARAMS)
    message = str(err.value)
    assert says in message and "\n" not in message, message
    assert message.startswith(str(tmp_path / "search.yaml")), message


def test_values_are_written_as_dvc_exp_run_reads_them():
    assert dvc_value(0.0002) == "0.0002" and dvc_value(1e-7) == "1e-07" and dvc_value(16) == "16"
    assert dvc_value(True) == "true" and dvc_value(None) == "null"
    assert dvc_value(["q_proj", "v_proj"]) == "[q_proj,v_proj]"
    assert param_value('["q_proj", "v_proj"]') == ["q_proj", "v_proj"] and param_value("nf4") == "nf4"


def test_a_study_is_tied_to_its_baseline_space_and_objective(tmp_path):
    spec, _ = spec_from(tmp_path, "space: {lora.r: [4, 8]}")
    other, _ = spec_from(tmp_path, "space: {lora.r: [4, 16]}")
    assert fingerprint(spec, "abc") == fingerprint(spec, "abc") != fingerprint(spec, "abd")
    assert fingerprint(spec, "abc") != fingerprint(other, "abc")


def test_the_leaderboard_ranks_finished_trials_by_the_objective_then_pruned_failed_and_interrupted():
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="s", direction="maximize")
    space = {"lora.r": optuna.distributions.CategoricalDistribution([4, 8, 16])}
    outcomes = [(0.30, None), (None, "pruned"), (0.45, None), (None, "failed"), (None, "interrupted"), (0.41, None)]
    for value, how in outcomes:
        trial = study.ask(space)
        if how == "interrupted":
            trial.set_user_attr("interrupted", True)
        if how == "pruned":
            trial.set_user_attr("step", 40)
            trial.report(-7.5, 40)
        study.tell(trial, value) if value is not None else study.tell(
            trial, state=TrialState.PRUNED if how == "pruned" else TrialState.FAIL)
    board = leaderboard.rows(study, maximize=True)
    assert [(r["trial"], r["state"]) for r in board] == [
        (2, "complete"), (5, "complete"), (0, "complete"), (1, "pruned"), (3, "failed"), (4, "interrupted")]
    assert [r["experiment"] for r in board[:3]] == ["s-2", "s-5", "s-0"]
    assert board[3]["value"] is None  # Optuna gives a pruned trial its last intermediate value: not the objective
    text = leaderboard.table(board, "rougeL.tuned")
    assert "| 2 | s-2 |" in text and "pruned at step 40" in text
    assert leaderboard.best_line(board, "rougeL.tuned").endswith("dvc exp apply s-2")
    assert [r["trial"] for r in leaderboard.rows(study, maximize=False)][:3] == [0, 5, 2]


def test_a_trial_without_a_result_is_failed_with_the_reason():
    from distributed import KilledWorker

    from samsum_qlora.search.driver import _outcome

    class Lost:  # a Dask future whose task lost its worker twice, or whose runner raised
        def __init__(self, err: Exception):
            self.err = err

        def result(self):
            raise self.err

    assert _outcome(Lost(KilledWorker("grid-1-7", None, 1))) == {
        "state": "failed", "reason": "the worker running it died, and so did the one that retried it"}
    assert _outcome(Lost(OSError("disk full"))) == {"state": "failed", "reason": "OSError: disk full"}


def test_trials_on_other_machines_need_the_baseline_on_the_git_remote(tmp_path):
    import os
    import shutil
    import subprocess
    import sys

    from conftest import git

    bare, repo = tmp_path / "remote.git", tmp_path / "repo"
    git(tmp_path, "init", "-q", "--bare", str(bare))
    git(tmp_path, "init", "-q", "-b", "main", str(repo))
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(ROOT / name, repo / name)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "a baseline never pushed")
    git(repo, "remote", "add", "origin", str(bare))
    proc = subprocess.run([sys.executable, "-m", "stages.search", "--grid", "lora.r=4,8", "--remote", "origin"],
                          cwd=repo, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: commit ") and "is not on the git remote origin: git push it" in last, last
    assert not (repo / ".search").exists()  # refused before anything was written
