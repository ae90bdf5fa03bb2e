from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from samsum_qlora.errors import PipelineError
from samsum_qlora.evaluation import charts
from samsum_qlora.evaluation.comparison import compare_metrics, pick_examples, rouge_plot_rows
from samsum_qlora.evaluation.report import render_report
from stages import compare

BASELINE = {
    "rouge1": 0.25,
    "rouge2": 0.08,
    "rougeL": 0.2,
    "rougeLsum": 0.21,
    "gen_len_mean": 41.5,
    "examples": 4,
    "seconds": 12.0,
}
ADAPTER = {
    "rouge1": 0.4134,
    "rouge2": 0.19,
    "rougeL": 0.335,
    "rougeLsum": 0.195,
    "gen_len_mean": 22.0,
    "examples": 4,
}


def prediction_row(example_id: str, rouge_l: float, prediction: str = "a summary") -> dict:
    return {
        "id": example_id,
        "dialogue": f"Ann: hi, this is dialogue {example_id}\nTom: hello",
        "reference": f"reference {example_id}",
        "prediction": prediction,
        "scores": {"rouge1": rouge_l, "rouge2": rouge_l, "rougeL": rouge_l, "rougeLsum": rouge_l},
    }


# rougeL per id: (baseline, adapter) -> gain
#   a: 0.5 -> 0.6  (+0.1)   b: 0.1 -> 0.9 (+0.8)   c: 0.4 -> 0.2 (-0.2)
#   d: 0.3 -> 0.3  ( 0.0)   e: 0.2 -> 0.5 (+0.3)
# ranked by gain: b (+0.8), e (+0.3), a (+0.1), d (0.0), c (-0.2) -> best b, median a, worst c
ROUGE_L = {"a": (0.5, 0.6), "b": (0.1, 0.9), "c": (0.4, 0.2), "d": (0.3, 0.3), "e": (0.2, 0.5)}
BASELINE_ROWS = [prediction_row(i, base, f"base summary {i}") for i, (base, _) in ROUGE_L.items()]
ADAPTER_ROWS = [prediction_row(i, tuned, f"tuned summary {i}") for i, (_, tuned) in ROUGE_L.items()]


def test_compare_metrics_deltas():
    comparison = compare_metrics(BASELINE, ADAPTER)

    assert comparison["delta"] == pytest.approx(
        {"rouge1": 0.1634, "rouge2": 0.11, "rougeL": 0.135, "rougeLsum": -0.015, "gen_len_mean": -19.5}
    )
    assert comparison["baseline"]["rouge1"] == 0.25
    assert comparison["adapter"]["gen_len_mean"] == 22.0
    assert comparison["examples"] == 4
    # Only the compared keys, not everything the metrics files happen to hold.
    assert set(comparison["baseline"]) == {"rouge1", "rouge2", "rougeL", "rougeLsum", "gen_len_mean"}


def test_compare_metrics_refuses_different_example_counts():
    with pytest.raises(PipelineError, match="4 test examples and the adapter on 3"):
        compare_metrics(BASELINE, {**ADAPTER, "examples": 3})


def test_plot_rows_pair_each_rouge_key_with_both_models():
    rows = rouge_plot_rows(compare_metrics(BASELINE, ADAPTER))

    assert rows[:2] == [
        {"metric": "rouge1", "model": "baseline", "bar": "rouge1 baseline", "score": 0.25},
        {"metric": "rouge1", "model": "adapter", "bar": "rouge1 adapter", "score": 0.4134},
    ]
    assert len(rows) == 8
    assert [row["metric"] for row in rows[::2]] == ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    assert {row["model"] for row in rows} == {"baseline", "adapter"}


def test_report_table_shows_percentages_and_signed_changes():
    report = render_report(compare_metrics(BASELINE, ADAPTER), [])

    assert "| metric | baseline | fine-tuned | change |" in report
    assert "| ROUGE-1 | 25.00 | 41.34 | +16.34 |" in report
    assert "| ROUGE-2 | 8.00 | 19.00 | +11.00 |" in report
    assert "| ROUGE-L | 20.00 | 33.50 | +13.50 |" in report
    assert "| ROUGE-Lsum | 21.00 | 19.50 | -1.50 |" in report
    assert "| mean generated length | 41.5 | 22.0 | -19.5 |" in report
    assert "Test examples: 4" in report


def test_report_never_shows_negative_zero():
    report = render_report(compare_metrics(BASELINE, {**BASELINE, "rouge1": 0.249_999_9}), [])

    assert "| ROUGE-1 | 25.00 | 25.00 | +0.00 |" in report


def test_pick_examples_takes_best_median_and_worst_by_rouge_l_gain():
    examples = pick_examples(BASELINE_ROWS, ADAPTER_ROWS)

    assert [(example.label, example.id) for example in examples] == [
        ("best", "b"),
        ("median", "a"),
        ("worst", "c"),
    ]
    best = examples[0]
    assert best.gain == pytest.approx(0.8)
    assert (best.baseline_prediction, best.adapter_prediction) == ("base summary b", "tuned summary b")


def test_pick_examples_does_not_depend_on_row_order_and_breaks_ties_by_id():
    shuffled = pick_examples(BASELINE_ROWS[::-1], ADAPTER_ROWS[2:] + ADAPTER_ROWS[:2])
    assert [example.id for example in shuffled] == ["b", "a", "c"]

    tied_baseline = [prediction_row(i, 0.1) for i in "zyx"]
    tied_adapter = [prediction_row(i, 0.4) for i in "xzy"]
    assert [example.id for example in pick_examples(tied_baseline, tied_adapter)] == ["x", "y", "z"]


def test_pick_examples_with_fewer_examples_than_asked():
    examples = pick_examples(BASELINE_ROWS[:2], ADAPTER_ROWS[:2])

    assert [(example.label, example.id) for example in examples] == [("best", "b"), ("worst", "a")]


def test_pick_examples_uses_common_ids_and_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="samsum_qlora.evaluation.comparison"):
        examples = pick_examples(BASELINE_ROWS, ADAPTER_ROWS[:3])  # adapter has a, b, c only

    assert [example.id for example in examples] == ["b", "a", "c"]
    assert "baseline has 5 example ids, adapter 3, 3 in common" in caplog.text


def test_pick_examples_without_common_ids_is_an_error():
    with pytest.raises(PipelineError, match="share no example id"):
        pick_examples(BASELINE_ROWS[:2], ADAPTER_ROWS[2:])


def test_report_examples_are_labelled_escaped_and_truncated():
    long_dialogue = "Ann: " + "word " * 200
    baseline_rows = [{**row, "prediction": "cats | dogs <file_photo>"} for row in BASELINE_ROWS]
    adapter_rows = [{**row, "dialogue": long_dialogue} if row["id"] == "b" else row for row in ADAPTER_ROWS]
    report = render_report(compare_metrics(BASELINE, ADAPTER), pick_examples(baseline_rows, adapter_rows))

    assert (
        report.index("### Best (largest ROUGE-L gain): `b`")
        < report.index("### Median")
        < report.index("### Worst")
    )
    assert "ROUGE-L 10.00 → 90.00 (+80.00)" in report
    assert "ROUGE-L 40.00 → 20.00 (-20.00)" in report
    assert "| reference b | cats \\| dogs &lt;file_photo&gt; | tuned summary b |" in report
    dialogue_block = report.split("```text\n")[1].split("\n```")[0]
    assert dialogue_block.endswith(" …")
    assert len(dialogue_block) <= 602


def write_inputs(root: Path) -> None:
    (root / "metrics").mkdir()
    (root / "data" / "predictions").mkdir(parents=True)
    for model, metrics, rows in (("baseline", BASELINE, BASELINE_ROWS), ("adapter", ADAPTER, ADAPTER_ROWS)):
        (root / "metrics" / f"{model}.json").write_text(json.dumps(metrics))
        lines = "".join(json.dumps(row) + "\n" for row in rows)
        (root / "data" / "predictions" / f"{model}.jsonl").write_text(lines)


def test_main_writes_comparison_plot_rows_and_report(tmp_path, monkeypatch):
    write_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)

    compare.main()

    # ROUGE-L only, under short names: the columns `dvc exp show` opens with; gains rounded to 6 decimals
    assert json.loads(Path("metrics/compare.json").read_text()) == {"rougeL": {"base": 0.2, "tuned": 0.335,
                                                                               "gain": 0.135}}
    rows = json.loads(Path("metrics/compare_rouge.json").read_text())
    assert len(rows) == 8 and rows[1] == {
        "metric": "rouge1", "model": "adapter", "bar": "rouge1 adapter", "score": 0.4134
    }
    report = Path("metrics/compare.md").read_text()
    assert "| ROUGE-1 | 25.00 | 41.34 | +16.34 |" in report
    assert "`b`" in report and "`c`" in report


@pytest.mark.parametrize(
    ("missing", "stage"),
    [
        ("metrics/adapter.json", "evaluate_adapter"),
        ("metrics/baseline.json", "evaluate_baseline"),
        ("data/predictions/baseline.jsonl", "evaluate_baseline"),
    ],
)
def test_main_names_the_missing_file_and_its_stage(tmp_path, monkeypatch, missing, stage):
    write_inputs(tmp_path)
    (tmp_path / missing).unlink()
    monkeypatch.chdir(tmp_path)

    with pytest.raises(
        PipelineError, match=re.escape(f"{missing} not found: it is written by the `{stage}` stage")
    ):
        compare.main()
    assert not Path("metrics/compare.json").exists()


def test_main_names_the_file_and_key_when_a_rouge_key_is_missing(tmp_path, monkeypatch):
    write_inputs(tmp_path)
    without_rouge2 = {key: value for key, value in ADAPTER.items() if key != "rouge2"}
    (tmp_path / "metrics" / "adapter.json").write_text(json.dumps(without_rouge2))
    monkeypatch.chdir(tmp_path)

    with pytest.raises(PipelineError, match="metrics/adapter.json has no `rouge2`"):
        compare.main()


def test_main_rejects_rouge_in_percent(tmp_path, monkeypatch):
    write_inputs(tmp_path)
    (tmp_path / "metrics" / "baseline.json").write_text(json.dumps({**BASELINE, "rougeL": 20.0}))
    monkeypatch.chdir(tmp_path)

    with pytest.raises(PipelineError, match="`rougeL` is 20.0, not a fraction"):
        compare.main()


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TRAIN_CURVE = "step\tloss\n10\t2.31\n20\t1.87\n30\t1.52\n40\t1.44\n"
EVAL_CURVE = "step\tloss\n20\t1.95\n40\t1.61\n"


def write_curves(root: Path, train: str | None = TRAIN_CURVE, validation: str | None = EVAL_CURVE) -> None:
    for name, text in (("training", train), ("validation", validation)):
        if text is not None:
            path = root / charts.LOSS_CURVES[name]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 5000, (path, len(data))
    assert b"IEND" in data[-12:]  # the image is complete


def linked_images(report: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)


def test_read_curve_sorts_by_step_and_keeps_the_last_value_of_a_step(tmp_path):
    curve = tmp_path / "loss.tsv"
    curve.write_text("step\tloss\n20\t1.5\n10\t2.0\n30\t1.2\n20\t1.4\n")  # 20 again: a resumed run logged it anew

    assert charts.read_curve(curve) == [(10, 2.0), (20, 1.4), (30, 1.2)]
    assert charts.read_curve(tmp_path / "absent.tsv") == []


def test_read_curve_names_the_file_when_it_is_not_a_loss_table(tmp_path):
    curve = tmp_path / "loss.tsv"
    curve.write_text("step\tlearning_rate\n1\t0.1\n")
    with pytest.raises(PipelineError, match="loss.tsv has no `step` and `loss` columns .*learning_rate"):
        charts.read_curve(curve)
    curve.write_text("step\tloss\n1\tabc\n")
    with pytest.raises(PipelineError, match=r"loss.tsv:2: step '1' and loss 'abc' should be numbers"):
        charts.read_curve(curve)


def test_main_draws_loss_and_rouge_images_and_links_them_from_the_report(tmp_path, monkeypatch):
    write_inputs(tmp_path)
    write_curves(tmp_path)
    monkeypatch.chdir(tmp_path)

    compare.main()

    assert_png(Path("metrics/plots/loss.png"))
    assert_png(Path("metrics/plots/rouge.png"))
    report = Path("metrics/compare.md").read_text()
    assert linked_images(report) == ["plots/rouge.png", "plots/loss.png"]
    for link in linked_images(report):  # relative to the report, so they resolve wherever the folder is copied
        assert (Path("metrics") / link).is_file()
    assert "not drawn" not in report and "No validation loss" not in report
    assert report.index("## Plots") < report.index("## Example predictions")


def test_without_curves_the_report_says_so_and_no_old_loss_image_stays(tmp_path, monkeypatch):
    write_inputs(tmp_path)
    stale = tmp_path / "metrics/plots/loss.png"  # from an earlier run that had curves
    stale.parent.mkdir(parents=True)
    stale.write_bytes(PNG_SIGNATURE)
    monkeypatch.chdir(tmp_path)

    compare.main()

    assert not stale.exists()
    assert_png(Path("metrics/plots/rouge.png"))
    report = Path("metrics/compare.md").read_text()
    assert linked_images(report) == ["plots/rouge.png"]
    assert "**Training and validation loss:** not drawn. No training loss was logged " \
           "(metrics/curves/plots/metrics/loss.tsv is absent" in report
    assert "No validation loss was logged (metrics/curves/plots/metrics/eval/loss.tsv is absent" in report


def test_training_curve_alone_is_drawn_and_the_missing_validation_curve_is_said(tmp_path, monkeypatch):
    write_inputs(tmp_path)
    write_curves(tmp_path, validation=None)
    monkeypatch.chdir(tmp_path)

    compare.main()

    assert_png(Path("metrics/plots/loss.png"))
    report = Path("metrics/compare.md").read_text()
    assert linked_images(report) == ["plots/rouge.png", "plots/loss.png"]
    assert "No validation loss was logged (metrics/curves/plots/metrics/eval/loss.tsv is absent: no validation " \
           "split" in report


def test_images_are_the_same_bytes_for_the_same_inputs():
    comparison = compare_metrics(BASELINE, ADAPTER)
    curves = {"training": [(10, 2.0), (20, 1.5)], "validation": [(20, 1.7)]}

    assert charts.rouge_png(comparison) == charts.rouge_png(comparison)
    assert charts.loss_png(curves) == charts.loss_png(curves)
    assert b"Matplotlib version" not in charts.loss_png(curves)  # matplotlib's default stamp in the metadata
