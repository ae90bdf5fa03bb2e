"""Stage start-up: the stages that only read and write files start without torch or transformers, and the start-up
benchmark reports each stage it times."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import bench_startup
from benchmarks.harness.stage_runs import stage_env


@pytest.mark.parametrize("stage", ["prepare", "compare", "card"])
def test_file_only_stages_load_neither_torch_nor_transformers(short_run: Path, tmp_path: Path, stage: str):
    env = stage_env(short_run, tmp_path / "compile-cache")
    before = {path: path.read_bytes() for path in (short_run / "metrics").glob("*.json")}
    costs = bench_startup.import_costs(bench_startup.imported_modules(short_run, env, bench_startup.STAGES[stage]))
    assert not {"torch", "transformers", "peft", "bitsandbytes"} & set(costs["loads"]), costs
    assert costs["imports_s"] > 0
    assert {path: path.read_bytes() for path in before} == before  # it ran on the run's files and wrote the same


@pytest.mark.parametrize("stage, unused", [
    ("tokenize_mask", "transformers.modeling_utils"),  # a tokenizer needs none of transformers' model classes
    ("evaluate_baseline", "datasets"),  # generation reads the prepared JSONL; only training plans from Arrow data
])
def test_model_stages_import_only_what_they_use(short_run: Path, tmp_path: Path, stage: str, unused: str):
    modules = bench_startup.imported_modules(short_run, stage_env(short_run, tmp_path / "cache"),
                                             bench_startup.STAGES[stage])
    assert "torch" in modules and unused not in modules


def test_bench_startup_times_the_stages_it_is_given(tmp_path: Path):
    bench_startup.main(["--runs", "2", "--stages", "prepare", "--out", str(tmp_path), "--label", "smoke"])
    (path,) = tmp_path.glob("startup-*-smoke.json")
    result = json.loads(path.read_text())
    assert result["config"]["stages"] == ["prepare"] and list(result["stages"]) == ["prepare"]
    prepare = result["stages"]["prepare"]
    assert len(prepare["runs"]) == 2 and 0 < prepare["first_output_s"] <= prepare["exit_s"]
    assert prepare["loads"] == [] and prepare["imports_s"] > 0


def test_bench_startup_refuses_an_unknown_stage(capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit):
        bench_startup.main(["--stages", "prepare,evaluate"])
    assert "unknown stage 'evaluate'; the stages are prepare, tokenize_mask" in capsys.readouterr().err
