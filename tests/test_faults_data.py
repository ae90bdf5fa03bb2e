"""Faults in the data and in what the project writes (issue 28): a lone surrogate in a JSON dataset, a truncated Arrow
file under data/tokenized/, a damaged adapter, error text that would list a folder or echo a file, and a base whose
configs point at custom code. Each failing case asserts the one `error:` line, the exit code and what was kept.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import TINY_MODEL, offline_params, stage_error_line
from samsum_qlora.errors import PipelineError
from samsum_qlora.files import drop_code_pointers, write_json, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "data" / "samples"
SURROGATE_ROW = '{"id": "s1", "dialogue": "A: hi \\ud800 there", "summary": "A greets."}\n'


def sample_rows(split: str, n: int) -> list[dict[str, Any]]:
    return json.loads((SAMPLES / f"{split}.json").read_text(encoding="utf-8"))[:n]


def project(root: Path, **sections: dict) -> Path:
    """A project folder with the offline profile's params over the tiny model and a small local dataset in mydata/."""
    params = offline_params(**{"model": {"base_model": str(TINY_MODEL)}, "data": {"source": "mydata"}, **sections})
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    for split, n in (("train", 8), ("validation", 4), ("test", 4)):
        (root / "mydata").mkdir(exist_ok=True)
        (root / "mydata" / f"{split}.jsonl").write_text(
            "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in sample_rows(split, n)), encoding="utf-8")
    return root


def fails_in_process(main: Any, capsys: pytest.CaptureFixture, *fragments: str) -> str:
    """Run `main` as a stage runs; return its one error line, after checking the exit code and the fragments."""
    line = stage_error_line(capsys, main)
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line


# Item 4: a lone surrogate

def test_surrogate_rows_are_dropped_and_counted(tmp_path, monkeypatch):
    from stages import prepare

    root = project(tmp_path)
    with (root / "mydata" / "train.jsonl").open("a", encoding="utf-8") as f:
        f.write(SURROGATE_ROW)
        f.write('{"id": "s2", "dialogue": "B: fine", "summary": "\\udc80 B is fine."}\n')
        f.write('{"id": "\\ud800", "dialogue": "C: an id UTF-8 cannot hold", "summary": "C speaks."}\n')
    monkeypatch.chdir(root)
    prepare.main()
    train = json.loads((root / "metrics" / "data.json").read_text(encoding="utf-8"))["train"]
    assert (train["rows_in"], train["rows_out"]) == (11, 9)
    assert {k: v for k, v in train["dropped"].items() if v} == {"dialogue_invalid_unicode": 1,
                                                               "summary_invalid_unicode": 1}
    written = [json.loads(line) for line in (root / "data/prepared/train.jsonl").read_text("utf-8").splitlines()]
    assert written[-1]["id"].startswith("train-")  # the id was derived from the text instead


def test_a_writer_meeting_a_surrogate_names_the_file_and_row_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "rows.jsonl"
    target.write_text('{"id": "earlier"}\n', encoding="utf-8")
    rows = [{"id": "ok", "dialogue": "fine"}, {"id": "bad", "dialogue": "A: \ud800"}]
    with pytest.raises(PipelineError) as err:
        write_jsonl(target, rows)
    message = str(err.value)
    assert f"{target}:2 (id bad): text UTF-8 cannot hold (\\ud800, a lone surrogate)" in message
    assert "\n" not in message and f"{target} was left as it was" in message
    assert target.read_text(encoding="utf-8") == '{"id": "earlier"}\n'
    assert sorted(os.listdir(tmp_path)) == ["rows.jsonl"]  # no temporary left
    with pytest.raises(PipelineError, match=r"data\.json: text UTF-8 cannot hold \(\\udc80"):
        write_json(tmp_path / "data.json", {"x": "\udc80"})
    assert not (tmp_path / "data.json").exists()


# Item 5: a truncated Arrow file under data/tokenized/

def test_truncated_arrow_file_is_one_line_naming_the_stage_to_rerun(tmp_path, monkeypatch, capsys):
    from datasets import Dataset, DatasetDict

    from stages import train

    monkeypatch.chdir(tmp_path)
    rows = {"input_ids": [[1, 2, 3] * 40] * 500, "labels": [[1, 2, 3] * 40] * 500}
    DatasetDict({"train": Dataset.from_dict(rows)}).save_to_disk("data/tokenized")
    arrow = next(Path("data/tokenized/train").glob("*.arrow"))
    os.truncate(arrow, arrow.stat().st_size // 2)  # a copy cut short
    kept = arrow.read_bytes()
    monkeypatch.setattr(train, "train", lambda params: train.load_tokenized())  # the loading only, no model
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(offline_params()), encoding="utf-8")
    fails_in_process(train.main, capsys, "data/tokenized could not be read (OSError: Expected to be able to read",
                     "re-create it with `dvc repro tokenize_mask` (or `dvc repro`)", "nothing was trained")
    assert arrow.read_bytes() == kept
    assert not Path("models").exists()


# Item 6: the advice for a damaged adapter

def test_damaged_adapter_advice_uses_force_and_says_which_path_is_cheaper(tmp_path, monkeypatch):
    import peft

    from samsum_qlora.model.adapter import load_adapter

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (adapter / name).write_text("{}")

    def damaged(*args: Any, **kwargs: Any) -> None:
        raise ValueError("header too large")

    monkeypatch.setattr(peft.PeftModel, "from_pretrained", damaged)
    with pytest.raises(PipelineError) as err:
        load_adapter(None, str(adapter))
    message = str(err.value)
    assert f"restore it from the DVC cache with `dvc checkout --force {adapter}` (seconds" in message
    assert "`dvc repro -f train` (trains again from scratch)" in message
    assert "`dvc checkout " + str(adapter) + "`" not in message


# Item 8: error text that says too much

def test_a_folder_listing_in_an_error_is_capped(tmp_path):
    from samsum_qlora.data.sources import load_source

    folder = tmp_path / "etc"
    folder.mkdir()
    for i in range(30):
        (folder / f"entry{i:02d}.conf").write_text("secret")
    with pytest.raises(PipelineError) as err:
        load_source(str(folder), "main")
    message = str(err.value)
    assert "found: entry00.conf, entry01.conf, entry02.conf, entry03.conf, entry04.conf and 25 more)" in message
    assert "entry05" not in message and "secret" not in message


def test_a_file_that_is_no_csv_is_not_echoed_into_the_error(tmp_path):
    from samsum_qlora.data.cleaning import check_columns
    from samsum_qlora.data.sources import read_table
    from samsum_qlora.params import DataParams

    secret = tmp_path / "passwd"
    line = "root:x:0:0:root:/root:/bin/bash-and-a-long-shell-path-past-forty-characters"
    secret.write_text(f"{line},a,b,c,d,e,f\nmore:x:1:1::/:/bin/sh\n")
    (tmp_path / "train.csv").symlink_to(secret)
    with pytest.raises(PipelineError) as err:
        check_columns(read_table(tmp_path / "train.csv"), DataParams())
    message = str(err.value)
    assert f"(columns found: {line[:39]}…, a, b, c, d and 2 more)" in message
    assert line not in message and "more:x" not in message


def test_a_split_column_with_many_values_is_capped():
    from samsum_qlora.data.sources import Table, split_by_column

    table = Table("one.csv", ["split"], [{"split": f"value{i}"} for i in range(12)])
    with pytest.raises(PipelineError, match=r"'value0', 'value1', .* and 7 more; expected train"):
        split_by_column(table)


# Item 9: custom-code pointers are not kept in what the project writes

def with_code_pointers(folder: Path) -> Path:
    shutil.copytree(TINY_MODEL, folder)
    for name, key, value in (("tokenizer_config.json", "auto_map", {"AutoTokenizer": ["custom.Tok", None]}),
                             ("config.json", "auto_map", {"AutoConfig": "custom.Config"})):
        config = json.loads((folder / name).read_text())
        config[key] = value
        (folder / name).write_text(json.dumps(config))
    return folder


def test_code_pointers_are_dropped_from_a_saved_folder(tmp_path, caplog):
    folder = with_code_pointers(tmp_path / "out")
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8, "auto_mapping": {"base_model_class": "X"}}))
    before = json.loads((folder / "tokenizer_config.json").read_text())
    with caplog.at_level("INFO"):
        dropped = drop_code_pointers(folder, "models/adapter")
    assert dropped == ["config.json: auto_map", "tokenizer_config.json: auto_map", "adapter_config.json: auto_mapping"]
    after = json.loads((folder / "tokenizer_config.json").read_text())
    assert "auto_map" not in after and after == {k: v for k, v in before.items() if k != "auto_map"}
    assert "auto_map" not in json.loads((folder / "config.json").read_text())
    assert json.loads((folder / "adapter_config.json").read_text()) == {"r": 8}
    [record] = [r for r in caplog.records if "custom-code" in r.getMessage()]
    assert record.getMessage().startswith("models/adapter: dropped the custom-code pointers")
    assert drop_code_pointers(folder, "models/adapter") == []  # nothing left to drop, nothing logged


@pytest.mark.slow
def test_the_train_stage_saves_an_adapter_without_the_bases_auto_map(tmp_path, monkeypatch):
    from stages import tokenize_mask, train

    base = with_code_pointers(tmp_path / "base")
    root = project(tmp_path / "repo", model={"base_model": str(base)},
                   training={"max_steps": 1, "save_steps": 1, "eval_steps": 1, "logging_steps": 1})
    for split, n in (("train", 8), ("validation", 4), ("test", 4)):
        write_jsonl(root / "data" / "prepared" / f"{split}.jsonl", sample_rows(split, n))
    monkeypatch.chdir(root)
    tokenize_mask.main()
    train.main()
    saved = json.loads((root / "models" / "adapter" / "tokenizer_config.json").read_text())
    assert "auto_map" not in saved
    assert json.loads((root / "models" / "adapter" / "adapter_config.json").read_text()).get("auto_mapping") is None
