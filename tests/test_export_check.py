"""The export check's verdict (samsum_qlora/evaluation/export_check.py) against hand-computed ROUGE-L, and the
predictions file it reads; tests/test_use_result.py runs the whole check on the tiny model."""

from __future__ import annotations

import json

import pytest

from samsum_qlora.errors import PipelineError
from samsum_qlora.evaluation.export_check import compare_predictions, evaluated_rows, file_sha256

ROWS = [
    {"id": "a", "dialogue": "A: hi", "reference": "Tom and Anna meet", "prediction": "Tom and Anna meet"},
    {"id": "b", "dialogue": "B: hi", "reference": "the cat sat", "prediction": "the cat sat"},
]


def test_a_changed_summary_moves_rouge_l_by_its_own_share():
    # "the dog sat" against "the cat sat": LCS "the sat" = 2 of 3 words each way, F1 2/3; mean (1 + 2/3) / 2.
    result = compare_predictions(["Tom and Anna meet", "the dog sat"], ROWS, 0.5)
    assert result == {"examples": 2, "exact_matches": 1, "rougeL_export": 83.3333, "rougeL_evaluated": 100.0,
                      "rougeL_difference": -16.6667, "max_rouge_drift": 0.5, "passed": False, "differing_ids": ["b"]}
    assert compare_predictions(["Tom and Anna meet", "the dog sat"], ROWS, 16.7)["passed"] is True
    # A gain counts as drift too: the export is not the evaluated model either way.
    rows = [{**ROWS[1], "prediction": "the dog sat"}]
    assert compare_predictions(["the cat sat"], rows, 0.5) == {
        "examples": 1, "exact_matches": 0, "rougeL_export": 100.0, "rougeL_evaluated": 66.6667,
        "rougeL_difference": 33.3333, "max_rouge_drift": 0.5, "passed": False, "differing_ids": ["b"]}


def test_identical_summaries_pass_at_zero_drift():
    result = compare_predictions([r["prediction"] for r in ROWS], ROWS, 0.0)
    assert (result["exact_matches"], result["rougeL_difference"], result["passed"]) == (2, 0.0, True)


def test_the_first_n_rows_are_read_and_a_bad_row_is_named(tmp_path):
    path = tmp_path / "adapter.jsonl"
    path.write_text("".join(json.dumps({**row, "scores": {}}) + "\n" for row in ROWS))
    assert evaluated_rows(path, 1) == [{**ROWS[0], "scores": {}}]
    assert [row["id"] for row in evaluated_rows(path, 64)] == ["a", "b"]  # fewer rows than asked: all of them
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({"id": "b", "prediction": "x"}) + "\n")
    with pytest.raises(PipelineError, match=r"adapter.jsonl:2: a prediction row needs text id, dialogue, reference, "
                                            r"prediction; run `dvc repro -f evaluate_adapter`"):
        evaluated_rows(path, 2)
    path.write_text("")
    with pytest.raises(PipelineError, match="holds no predictions"):
        evaluated_rows(path, 2)


def test_file_sha256(tmp_path):
    (tmp_path / "f").write_bytes(b"abc")
    assert file_sha256(tmp_path / "f") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert file_sha256(tmp_path / "missing") is None
