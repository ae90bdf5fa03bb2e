"""Tests for the prepare stage: local formats, cleaning, sampling, metrics, errors and the hub path."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from samsum_qlora.data.cleaning import (
    DROP_REASONS,
    MAX_DIALOGUE_CHARS,
    derive_id,
    length_stats,
    normalize_text,
    sample_rows,
)
from samsum_qlora.data.sources import load_source
from samsum_qlora.errors import PipelineError
from samsum_qlora.params import DataParams
from stages import prepare

REPO = Path(__file__).resolve().parents[1]
COOKIES = {
    "dialogue": "Amanda: I baked cookies. Do you want some?\r\nJerry: Sure!",
    "summary": "Amanda baked cookies and will bring Jerry some.",
}


def chats(split: str, n: int) -> list[dict[str, Any]]:
    """SAMSum-shaped rows without ids, distinct per split."""
    return [{"dialogue": f"Ola: {split} message {i} 😊\r\nTom: reply {i}\r\nOla: bye",
             "summary": f"Ola and Tom, {i}."} for i in range(n)]


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Write rows in the format given by the file extension (`.json` = a JSON array)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        path.write_text(json.dumps(rows, ensure_ascii=False, indent=2), encoding="utf-8")
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    elif path.suffix == ".csv":
        with path.open("w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
            writer.writeheader()
            writer.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def every_split(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    return {"train": rows, "validation": rows, "test": rows}


def read_prepared(root: Path, split: str) -> list[dict[str, Any]]:
    lines = (root / f"data/prepared/{split}.jsonl").read_text("utf-8").splitlines()
    return [json.loads(line) for line in lines]


def write_folder(folder: Path, ext: str, splits: dict[str, list[dict[str, Any]]]) -> Path:
    for name, rows in splits.items():
        write_rows(folder / f"{name}{ext}", rows)
    return folder


def run_main(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int = 42, **data: Any) -> dict:
    """Run the stage's main() in tmp_path with the given data params; return outputs and metrics."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"seed": seed, "data": data}), encoding="utf-8")
    prepare.main()
    out = {split: read_prepared(tmp_path, split) for split in ("train", "validation", "test")}
    out["metrics"] = json.loads((tmp_path / "metrics/data.json").read_text("utf-8"))
    return out


@pytest.fixture
def no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything reaches for the hub."""
    import datasets

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"load_dataset called with {args}")

    monkeypatch.setattr(datasets, "load_dataset", refuse)


def test_samsum_folder_without_ids_gets_stable_unique_ids(tmp_path, monkeypatch, no_hub):
    splits = {"train": [COOKIES, *chats("train", 5)], "validation": chats("val", 3), "test": chats("test", 4)}
    write_folder(tmp_path / "samsum", ".json", splits)
    out = run_main(tmp_path, monkeypatch, source="samsum")
    first = {s: (tmp_path / f"data/prepared/{s}.jsonl").read_bytes() for s in ("train", "validation", "test")}

    cookies = {"id": "train-8d5ed8a1dbe2", "dialogue": COOKIES["dialogue"].replace("\r\n", "\n"),
               "summary": COOKIES["summary"]}
    assert out["train"][0] == cookies
    for split, n in (("train", 6), ("validation", 3), ("test", 4)):
        ids = [row["id"] for row in out[split]]
        assert len(ids) == len(set(ids)) == n
        assert all(re.fullmatch(rf"{split}-[0-9a-f]{{12}}", i) for i in ids)
        assert all(set(row) == {"id", "dialogue", "summary"} for row in out[split])
    assert "😊" in first["train"].decode("utf-8")  # written as UTF-8, not \u escapes

    prepare.main()
    assert first == {s: (tmp_path / f"data/prepared/{s}.jsonl").read_bytes() for s in first}


EXPECTED = [{"id": "1", "dialogue": 'Ann: hi, "Bob"\nBob: héllo', "summary": "They greet."},
            {"id": "2", "dialogue": "Cy: bye", "summary": "Cy leaves."}]


@pytest.mark.parametrize("ext", [".json", ".jsonl", ".csv", ".parquet"])
def test_each_format_in_a_folder_gives_the_same_rows(tmp_path, ext, no_hub):
    rows = [{**row, "dialogue": row["dialogue"].replace("\n", "\r\n")} for row in EXPECTED]
    folder = write_folder(tmp_path / "d", ext, {"train": rows, "dev": rows, "test": rows})
    outputs, _ = prepare.prepare(load_source(str(folder), "main"), DataParams(source=str(folder)), 42)
    assert outputs == every_split(EXPECTED)


def test_json_file_holding_json_lines_is_detected(tmp_path):
    rows = [{**row, "split": split} for split in ("train", "val", "test") for row in EXPECTED]
    path = write_rows(tmp_path / "all.jsonl", rows)
    path = path.rename(tmp_path / "all.json")
    outputs, _ = prepare.prepare(load_source(str(path), "main"), DataParams(source=str(path)), 42)
    assert outputs["validation"] == EXPECTED


@pytest.mark.parametrize("ext", [".jsonl", ".csv", ".parquet"])
def test_single_file_is_split_by_its_split_column(tmp_path, ext):
    rows = [{"split": "train", **EXPECTED[0]}, {"split": "test", **EXPECTED[1]},
            {"split": "validation", **EXPECTED[1]}, {"split": "train", **EXPECTED[1]}]
    path = write_rows(tmp_path / f"all{ext}", rows)
    outputs, metrics = prepare.prepare(load_source(str(path), "main"), DataParams(source=str(path)), 42)
    assert outputs == {"train": EXPECTED, "validation": EXPECTED[1:], "test": EXPECTED[1:]}
    assert metrics["train"]["rows_in"] == 2


def test_columns_come_from_params_and_numeric_ids_become_strings(tmp_path, monkeypatch):
    rows = [{"dialog_id": 101, "conversation": "A: x\nB: y", "gist": "A and B."},
            {"dialog_id": 102, "conversation": "C: z", "gist": "C alone."}]
    write_folder(tmp_path / "d", ".jsonl", every_split(rows))
    out = run_main(tmp_path, monkeypatch, source="d", dialogue_column="conversation", summary_column="gist",
                   id_column="dialog_id")
    assert out["test"] == [{"id": "101", "dialogue": "A: x\nB: y", "summary": "A and B."},
                           {"id": "102", "dialogue": "C: z", "summary": "C alone."}]


def test_every_drop_reason_is_counted(tmp_path, monkeypatch):
    good = {"dialogue": "A: hi\nB: hello", "summary": "They greet."}
    train = [
        {"id": "a", **good},
        {"id": "b", "dialogue": "C: yo", "summary": "C says yo."},
        {"id": "c", "summary": "s"},                                       # dialogue_missing (absent)
        {"id": "d", "dialogue": None, "summary": "s"},                     # dialogue_missing (null)
        {"id": "e", "dialogue": None, "summary": ""},                      # dialogue_missing: 1st reason
        {"id": "n", "dialogue": float("nan"), "summary": "s"},             # dialogue_missing (NaN)
        {"id": "f", "dialogue": 5, "summary": "s"},                        # dialogue_not_text
        {"id": "g", "dialogue": ["A: hi"], "summary": "s"},                # dialogue_not_text
        {"id": "h", "dialogue": "  \r\n\t ", "summary": "s"},              # dialogue_empty
        {"id": "i", "dialogue": "A: x"},                                   # summary_missing
        {"id": "j", "dialogue": "A: x", "summary": 3.5},                   # summary_not_text
        {"id": "k", "dialogue": "A: x", "summary": " \n "},                # summary_empty
        {"id": "l", "dialogue": "x" * (MAX_DIALOGUE_CHARS + 1), "summary": "s"},  # dialogue_too_long
        {"id": "m", "dialogue": "x" * MAX_DIALOGUE_CHARS, "summary": "s"},  # at the limit: kept
        {"id": "a", "dialogue": "Z: other", "summary": "Other."},          # duplicate_id
        {"id": "c", **good},                                               # c's first row was dropped: kept
        {"id": None, **good},                                              # null id: derived
        {"id": "", "dialogue": "E: e", "summary": "E."},                   # empty id: derived
        {"id": None, **good},                                              # same derived id: duplicate_id
    ]
    write_folder(tmp_path / "d", ".jsonl", {"train": train, "validation": [good], "test": [good]})
    out = run_main(tmp_path, monkeypatch, source="d")

    m = out["metrics"]["train"]
    assert m["dropped"] == {"dialogue_missing": 4, "dialogue_not_text": 2, "dialogue_invalid_unicode": 0,
                            "dialogue_empty": 1, "summary_missing": 1, "summary_not_text": 1,
                            "summary_invalid_unicode": 0, "summary_empty": 1, "dialogue_too_long": 1,
                            "duplicate_id": 2}
    assert (m["rows_in"], m["rows_usable"], m["rows_out"]) == (19, 6, 6)
    ids = [row["id"] for row in out["train"]]
    assert ids == ["a", "b", "m", "c", derive_id("train", good["dialogue"], good["summary"]),
                   derive_id("train", "E: e", "E.")]
    assert out["metrics"]["test"]["dropped"] == dict.fromkeys(DROP_REASONS, 0)


def test_normalisation_keeps_inner_newlines_and_strips_the_rest():
    assert normalize_text("\n  A: hi  \r\nB: yo\t\rC: x \n\n\n") == "A: hi\nB: yo\nC: x"
    assert normalize_text("A: one\n\nB: two") == "A: one\n\nB: two"


def test_sampling_is_seeded_ordered_and_keeps_all_when_too_few():
    rows = [{"id": str(i), "dialogue": "d", "summary": "s"} for i in range(50)]
    picked = sample_rows(rows, 10, seed=1)
    assert picked == sample_rows(rows, 10, seed=1)
    assert picked != sample_rows(rows, 10, seed=2)
    positions = [int(row["id"]) for row in picked]
    assert len(positions) == 10 and positions == sorted(positions)
    assert sample_rows(rows, 80, seed=1) == rows
    assert sample_rows(rows, None, seed=1) == rows


def test_sample_sizes_from_params(tmp_path, monkeypatch):
    write_folder(tmp_path / "d", ".jsonl", {"train": chats("train", 30), "validation": chats("val", 4),
                                            "test": chats("test", 4)})
    out = run_main(tmp_path, monkeypatch, source="d", train_samples=5, validation_samples=10)
    assert len(out["train"]) == 5 and len(out["validation"]) == 4
    assert out["metrics"]["train"]["rows_usable"] == 30 and out["metrics"]["train"]["rows_out"] == 5
    other_seed = run_main(tmp_path, monkeypatch, seed=7, source="d", train_samples=5)
    assert [r["id"] for r in other_seed["train"]] != [r["id"] for r in out["train"]]


def test_metrics_shape_and_values(tmp_path, monkeypatch):
    rows = [{"dialogue": "A: " + "x" * i + "\nB: ok\n\nA: bye", "summary": "s" * i} for i in range(1, 21)]
    write_folder(tmp_path / "d", ".csv", {"train": rows, "validation": rows[:1], "test": rows[:1]})
    metrics = run_main(tmp_path, monkeypatch, source="d")["metrics"]
    assert set(metrics) == {"source", "train", "validation", "test"} and metrics["source"] == "d"
    train = metrics["train"]
    assert train["summary_chars"] == {"mean": 10.5, "p50": 10, "p95": 19, "max": 20}
    assert train["dialogue_chars"]["max"] == 20 + len("A: \nB: ok\n\nA: bye")
    assert train["dialogue_turns_mean"] == 3.0
    assert length_stats([7]) == {"mean": 7.0, "p50": 7, "p95": 7, "max": 7}


def expect_error(source: Path | str, *fragments: str, **data: Any) -> str:
    with pytest.raises(PipelineError) as err:
        tables = load_source(str(source), "main")
        prepare.prepare(tables, DataParams(source=str(source), **data), 42)
    message = str(err.value)
    for fragment in fragments:
        assert fragment in message
    return message


def test_missing_paths_are_reported_not_sent_to_the_hub(tmp_path, monkeypatch, no_hub):
    expect_error(tmp_path / "nowhere", f"{tmp_path / 'nowhere'}' does not exist")
    monkeypatch.chdir(tmp_path)
    expect_error("data/samsum.jsonl", "'data/samsum.jsonl' does not exist")


@pytest.mark.parametrize("content", [b"", b"  \n\n"])
def test_empty_file(tmp_path, content):
    folder = write_folder(tmp_path / "d", ".jsonl", {"train": EXPECTED, "validation": EXPECTED})
    (folder / "test.jsonl").write_bytes(content)
    expect_error(folder, f"{folder / 'test.jsonl'} is empty")


def test_malformed_json_array_names_the_line(tmp_path):
    folder = write_folder(tmp_path / "d", ".json", every_split(EXPECTED))
    broken = '[\n  {"dialogue": "a",\n   "summary": "b"\n  {"dialogue": "c"}\n]\n'  # no "}," on line 3
    (folder / "validation.json").write_text(broken)
    expect_error(folder, f"{folder / 'validation.json'}:4: not valid JSON")


def test_broken_jsonl_line_names_the_line(tmp_path):
    folder = write_folder(tmp_path / "d", ".jsonl", every_split(EXPECTED))
    with (folder / "train.jsonl").open("a") as f:
        f.write('\n{"dialogue": "cut off", "summ\n')
    expect_error(folder, f"{folder / 'train.jsonl'}:4: not valid JSON")


def test_invalid_utf8_names_the_line(tmp_path):
    folder = write_folder(tmp_path / "d", ".csv", every_split(EXPECTED))
    (folder / "test.csv").write_bytes(b"id,dialogue,summary\n1,A: hi,ok\n2,A: caf\xe9,ok\n")
    expect_error(folder, f"{folder / 'test.csv'}:3: not valid UTF-8", "0xe9")


def test_missing_column_lists_the_columns_found(tmp_path):
    rows = [{"id": "1", "conversation": "A: hi", "summary": "s"}]
    folder = write_folder(tmp_path / "d", ".jsonl", every_split(rows))
    expect_error(folder, str(folder / "train.jsonl"), "no column 'dialogue'",
                 "columns found: id, conversation, summary", "data.dialogue_column")
    expect_error(folder, "no column 'gist'", "data.summary_column", dialogue_column="conversation",
                 summary_column="gist")


def test_missing_split_lists_what_was_found(tmp_path):
    folder = write_folder(tmp_path / "d", ".json", {"train": EXPECTED, "validation": EXPECTED})
    (folder / "notes.txt").write_text("x")
    expect_error(folder, "no test file", "found: notes.txt, train.json, validation.json")
    rows = [{"split": "train", **EXPECTED[0]}, {"split": "test", **EXPECTED[1]}]
    single = write_rows(tmp_path / "all.csv", rows)
    expect_error(single, "no rows with split=validation", "split values found: train, test")


def test_split_without_usable_rows(tmp_path):
    bad = [{"dialogue": " ", "summary": "s"}, {"dialogue": "A: hi", "summary": None}]
    folder = write_folder(tmp_path / "d", ".jsonl", {"train": EXPECTED, "validation": EXPECTED, "test": bad})
    expect_error(folder, "test split", str(folder / "test.jsonl"), "dialogue_empty=1, summary_missing=1")


def test_cli_error_is_one_line_and_leaves_outputs_untouched(tmp_path):
    rows = [{"dialogue": "A: hi", "summary": "s"}]
    write_folder(tmp_path / "d", ".jsonl", {**every_split(rows), "test": [{"dialogue": "A: hi"}]})
    (tmp_path / "params.yaml").write_text("data:\n  source: d\n")
    (tmp_path / "data/prepared").mkdir(parents=True)
    (tmp_path / "data/prepared/train.jsonl").write_text("old\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "stages.prepare"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and proc.stderr.rstrip().splitlines()[-1] == errors[0]
    assert "test.jsonl" in errors[0] and "'summary'" in errors[0] and "Traceback" not in proc.stderr
    assert (tmp_path / "data/prepared/train.jsonl").read_text() == "old\n"
    assert sorted(p.name for p in (tmp_path / "data/prepared").iterdir()) == ["train.jsonl"]
    assert not (tmp_path / "metrics").exists()


def test_hub_dataset_is_loaded_at_the_pinned_revision(tmp_path, monkeypatch):
    import datasets

    calls = []
    columns = {"id": [13818513, 13728867], "dialogue": ["A: hi\r\nB: hey", "C: yo"],
               "summary": ["Greeting.", "Yo."]}

    def fake_load_dataset(path: str, **kwargs: Any) -> datasets.DatasetDict:
        calls.append((path, kwargs))
        return datasets.DatasetDict(every_split(datasets.Dataset.from_dict(columns)))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    out = run_main(tmp_path, monkeypatch, source="someone/chats", revision="abc123")
    assert calls == [("someone/chats", {"revision": "abc123"})]
    assert out["validation"] == [{"id": "13818513", "dialogue": "A: hi\nB: hey", "summary": "Greeting."},
                                 {"id": "13728867", "dialogue": "C: yo", "summary": "Yo."}]
    assert out["metrics"]["source"] == "someone/chats"

    monkeypatch.setattr(datasets, "load_dataset", lambda path, **kwargs: datasets.DatasetDict(
        {name: datasets.Dataset.from_dict(columns) for name in ("train", "test")}))
    expect_error("someone/chats", "no validation split", "splits found: train, test")


def test_hub_failure_suggests_local_files(monkeypatch):
    import datasets

    def offline(path: str, **kwargs: Any) -> None:
        raise ConnectionError("Couldn't reach 'someone/chats' on the Hub (OfflineModeIsEnabled)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    message = expect_error("someone/chats", "could not load hub dataset 'someone/chats'",
                           "Couldn't reach 'someone/chats' on the Hub", "-S data.source=path/to/folder")
    assert "\n" not in message
