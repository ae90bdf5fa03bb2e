"""The data stages through DVC on the offline profile, in a throwaway git repository: cache hits and misses, and a
user's folder of dialogues. The whole pipeline end to end runs in tests/test_readme.py, as the README's quick-start
runs it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from conftest import make_project, offline_params, run_dvc

pytestmark = pytest.mark.slow


def ran(output: str) -> list[str]:
    """The stages DVC says it ran, in order."""
    return re.findall(r"Running stage '([\w-]+)'", output)


def skipped(output: str) -> list[str]:
    return re.findall(r"Stage '([\w-]+)' didn't change, skipping", output)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_data_stages_run_once_and_rerun_only_what_a_param_touches(tmp_path):
    repo = make_project(tmp_path / "repo", offline_params())
    first = run_dvc(repo, "repro", "tokenize_mask")
    assert ran(first.stdout) == ["prepare", "tokenize_mask"]
    for split in ("train", "validation", "test"):
        assert (repo / f"data/prepared/{split}.jsonl").is_file()
    assert (repo / "data/tokenized/dataset_dict.json").is_file()
    assert read_json(repo / "metrics/data.json")["train"]["rows_out"] == 320
    assert read_json(repo / "metrics/tokens.json")["train"]["examples"] == 320

    again = run_dvc(repo, "repro", "tokenize_mask")
    assert ran(again.stdout) == []
    assert sorted(skipped(again.stdout)) == ["prepare", "tokenize_mask"]

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["prompt"]["max_length"] = 200
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = run_dvc(repo, "repro", "tokenize_mask")
    assert ran(changed.stdout) == ["tokenize_mask"]
    assert skipped(changed.stdout) == ["prepare"]
    assert read_json(repo / "metrics/tokens.json")["train"]["length_max"] <= 200


def test_samsum_style_folder_without_ids_flows_through_the_data_stages(tmp_path):
    folder = tmp_path / "my-dialogues"
    folder.mkdir()
    samples = Path(__file__).resolve().parents[1] / "data" / "samples"
    for split in ("train", "validation", "test"):
        rows = json.loads((samples / f"{split}.json").read_text())[:12]
        (folder / f"{split}.json").write_text(json.dumps([{"dialogue": r["dialogue"], "summary": r["summary"]}
                                                          for r in rows]))
    repo = make_project(tmp_path / "repo", offline_params())
    out = run_dvc(repo, "exp", "run", "-S", f"data.source={folder}", "tokenize_mask")
    assert ran(out.stdout) == ["prepare", "tokenize_mask"]
    rows = [json.loads(line) for line in (repo / "data/prepared/train.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all(re.fullmatch(r"train-[0-9a-f]{12}", r["id"]) for r in rows)
    assert read_json(repo / "metrics/tokens.json")["validation"]["examples"] == 12
