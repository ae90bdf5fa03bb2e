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
from samsum_qlora.evaluation.scoring import ROUGE_KEYS
from samsum_qlora.evaluation.uncertainty import gain_intervals
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

# Gain intervals (fractions) for the tables below: ROUGE-Lsum's includes 0, the others do not.
INTERVALS = {"rouge1": {"low": 0.1012, "high": 0.2251}, "rouge2": {"low": 0.05, "high": 0.17},
             "rougeL": {"low": 0.0734, "high": 0.1966}, "rougeLsum": {"low": -0.0821, "high": 0.0523}}


def compared(baseline: dict = BASELINE, adapter: dict = ADAPTER) -> dict:
    """The comparison as the compare stage builds it: the metrics compared, with the gains' intervals."""
    return {**compare_metrics(baseline, adapter), "interval": INTERVALS}


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
    rows = rouge_plot_rows(compared())

    interval = {"gain": pytest.approx(0.1634), "gain_low": 0.1012, "gain_high": 0.2251}  # the key's, on both rows
    assert rows[:2] == [
        {"metric": "rouge1", "model": "baseline", "bar": "rouge1 baseline", "score": 0.25, **interval},
        {"metric": "rouge1", "model": "adapter", "bar": "rouge1 adapter", "score": 0.4134, **interval},
    ]
    assert rows[-1]["gain_low"] == -0.0821 and rows[-1]["gain_high"] == 0.0523
    assert len(rows) == 8
    assert [row["metric"] for row in rows[::2]] == ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    assert {row["model"] for row in rows} == {"baseline", "adapter"}


def test_report_table_shows_percentages_and_signed_changes():
    report = render_report(compared(), [])

    assert "| metric | baseline | fine-tuned | change | 95% interval of the change |" in report
    assert "| ROUGE-1 | 25.00 | 41.34 | +16.34 | +10.12 to +22.51 |" in report
    assert "| ROUGE-2 | 8.00 | 19.00 | +11.00 | +5.00 to +17.00 |" in report
    assert "| ROUGE-L | 20.00 | 33.50 | +13.50 | +7.34 to +19.66 |" in report
    assert "| ROUGE-Lsum | 21.00 | 19.50 | -1.50 | -8.21 to +5.23 |" in report
    assert "| mean generated length | 41.5 | 22.0 | -19.5 | |" in report
    assert "Test examples: 4" in report


def test_report_never_shows_negative_zero():
    report = render_report(compared(BASELINE, {**BASELINE, "rouge1": 0.249_999_9}), [])

    assert "| ROUGE-1 | 25.00 | 25.00 | +0.00 | +10.12 to +22.51 |" in report


def test_report_says_which_changes_are_not_distinguishable_from_no_change():
    report = render_report(compared(), [])

    assert "resampling the test examples (9,999 paired-bootstrap resamples" in report
    assert "It does not cover run-to-run training noise" in report
    assert ("- ROUGE-Lsum: the interval includes 0, so the change is not distinguishable from no change on this "
            "test set.") in report
    assert report.count("not distinguishable from no change") == 1  # the other three intervals exclude 0


def test_report_counts_an_interval_ending_at_zero_as_including_it():
    at_zero = {key: {"low": 0.0, "high": 0.03} for key in ROUGE_KEYS}
    report = render_report({**compare_metrics(BASELINE, ADAPTER), "interval": at_zero}, [])

    assert report.count("not distinguishable from no change") == 4
    clear = {key: {"low": 0.0001, "high": 0.03} for key in ROUGE_KEYS}
    assert "distinguishable" not in render_report({**compare_metrics(BASELINE, ADAPTER), "interval": clear}, [])


def scored_rows(gains_in_points: dict[str, list[float]], ids: str = "abc") -> tuple[list[dict], list[dict]]:
    """Baseline rows scoring 0.25 on every key and adapter rows scoring 0.25 + the gain (points / 100)."""
    baseline = [{"id": i, "scores": dict.fromkeys(ROUGE_KEYS, 0.25)} for i in ids]
    adapter = [{"id": i, "scores": {key: 0.25 + gains[n] / 100 for key, gains in gains_in_points.items()}}
               for n, i in enumerate(ids)]
    return baseline, adapter


def in_points(interval: dict) -> tuple[float, float]:
    return 100 * interval["low"], 100 * interval["high"]


def test_interval_of_gains_0_0_3_points_is_0_to_3():
    """Three examples with gains 0, 0 and 3 points. A resample draws 3 of them with replacement: 27 equally likely
    draws, and its mean gain is k points, k the number of times the third example is drawn (binomial, 3 draws,
    p = 1/3): P(0) = 8/27, P(1) = 12/27, P(2) = 6/27, P(3) = 1/27. The 2.5th percentile is therefore 0 (8/27 of the
    mass is there) and the 97.5th is 3 (1/27 = 3.7% > 2.5% of the mass is there). The second key doubles every
    gain: resamples are shared by all keys, so its interval is exactly twice the first's."""
    gains = {"rouge1": [0, 0, 3], "rouge2": [0, 0, 6], "rougeL": [3, 0, 0], "rougeLsum": [0, 3, 0]}
    intervals = gain_intervals(*scored_rows(gains))

    assert in_points(intervals["rouge1"]) == pytest.approx((0, 3))
    assert in_points(intervals["rouge2"]) == pytest.approx((0, 6))
    assert in_points(intervals["rougeL"]) == pytest.approx((0, 3))  # which example gains does not matter
    assert in_points(intervals["rougeLsum"]) == pytest.approx((0, 3))


def test_interval_of_gains_1_2_3_points_is_1_to_3():
    """Gains 1, 2 and 3 points: the resample mean is 1 only when the first example is drawn three times (1/27 =
    3.7% of the mass) and 3 only when the third is (also 1/27): the 2.5th and 97.5th percentiles are 1 and 3. A
    negative copy gives the mirror interval."""
    gains = {"rouge1": [1, 2, 3], "rouge2": [-1, -2, -3], "rougeL": [2, 2, 2], "rougeLsum": [3, 1, 2]}
    intervals = gain_intervals(*scored_rows(gains))

    assert in_points(intervals["rouge1"]) == pytest.approx((1, 3))
    assert in_points(intervals["rouge2"]) == pytest.approx((-3, -1))
    assert in_points(intervals["rougeL"]) == pytest.approx((2, 2))  # every resample has the same mean
    assert in_points(intervals["rougeLsum"]) == pytest.approx((1, 3))


def test_interval_pairs_the_two_models_by_example():
    """Scores that vary a lot between examples but gain exactly 2 points on each: paired, every resample's mean
    gain is 2; resampling the two models independently would spread it over tens of points."""
    baseline = [{"id": i, "scores": dict.fromkeys(ROUGE_KEYS, score)}
                for i, score in zip("abc", (0.125, 0.5, 0.875), strict=True)]
    adapter = [{"id": row["id"], "scores": {key: value + 0.02 for key, value in row["scores"].items()}}
               for row in reversed(baseline)]

    for key, interval in gain_intervals(baseline, adapter).items():
        assert in_points(interval) == pytest.approx((2, 2)), key


def test_the_seed_makes_the_interval_repeatable():
    ids = [f"ex{n:02d}" for n in range(40)]
    gains = {key: [((7 * n + shift) % 11) - 4 for n in range(40)] for shift, key in enumerate(ROUGE_KEYS)}
    baseline, adapter = scored_rows(gains, ids)

    first = gain_intervals(baseline, adapter)
    assert gain_intervals(baseline, adapter) == first
    assert gain_intervals(baseline[::-1], adapter[5:] + adapter[:5]) == first  # paired by id, not by row order
    assert gain_intervals(baseline, adapter, seed=1) != first  # the seed is what fixes it
    for key in ROUGE_KEYS:
        mean = sum(gains[key]) / len(ids)
        low, high = in_points(first[key])
        assert low < mean < high and high - low < 4, (key, low, mean, high)


def test_interval_refuses_predictions_on_different_examples():
    baseline, adapter = scored_rows(dict.fromkeys(ROUGE_KEYS, [1, 2, 3]))
    adapter[2] = {**adapter[2], "id": "z"}

    with pytest.raises(PipelineError) as error:
        gain_intervals(baseline, adapter)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("the baseline and adapter predictions are not on the same test examples (ids only in "
                              "the baseline's: 1 (c); only in the adapter's: 1 (z))")
    assert message.endswith("run `dvc repro` to evaluate both again")


def test_interval_refuses_a_repeated_id_and_a_single_example():
    baseline, adapter = scored_rows(dict.fromkeys(ROUGE_KEYS, [1, 2, 3]))
    repeated = r"the adapter predictions repeat 1 example ids \(a\): each test example must be scored once"
    with pytest.raises(PipelineError, match=repeated):
        gain_intervals(baseline, [*adapter, adapter[0]])

    with pytest.raises(PipelineError, match="needs at least 2 test examples.*scored on 1; set eval.max_samples"):
        gain_intervals(baseline[:1], adapter[:1])


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
    report = render_report(compared(), pick_examples(baseline_rows, adapter_rows))

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

    # ROUGE-L only, under short names: the columns `dvc exp show` opens with; gains rounded to 6 decimals. The
    # interval is the bootstrap's over the per-example gains of the predictions (a +0.1, b +0.8, c -0.2, d 0,
    # e +0.3 on every key).
    interval = gain_intervals(BASELINE_ROWS, ADAPTER_ROWS)
    low, high = round(interval["rougeL"]["low"], 6), round(interval["rougeL"]["high"], 6)
    assert -0.2 < low < 0.2 < high < 0.8  # the mean gain is 0.2; no resample mean is outside [-0.2, 0.8]
    assert json.loads(Path("metrics/compare.json").read_text()) == {"rougeL": {"base": 0.2, "tuned": 0.335,
                                                                               "gain": 0.135, "low": low,
                                                                               "high": high}}
    rows = json.loads(Path("metrics/compare_rouge.json").read_text())
    assert len(rows) == 8 and rows[1] == {
        "metric": "rouge1", "model": "adapter", "bar": "rouge1 adapter", "score": 0.4134, "gain": 0.1634,
        "gain_low": round(interval["rouge1"]["low"], 6), "gain_high": round(interval["rouge1"]["high"], 6),
    }
    report = Path("metrics/compare.md").read_text()
    assert f"| ROUGE-1 | 25.00 | 41.34 | +16.34 | {100 * low:+.2f} to {100 * high:+.2f} |" in report
    assert "`b`" in report and "`c`" in report


def test_main_refuses_predictions_on_different_examples(tmp_path, monkeypatch):
    write_inputs(tmp_path)
    rows = "".join(json.dumps(row) + "\n" for row in ADAPTER_ROWS[:4])  # e is missing
    (tmp_path / "data" / "predictions" / "adapter.jsonl").write_text(rows)
    monkeypatch.chdir(tmp_path)

    with pytest.raises(PipelineError, match=r"not on the same test examples \(ids only in the baseline's: 1 \(e\); "
                                            r"only in the adapter's: 0\)"):
        compare.main()
    assert not Path("metrics/compare.json").exists()


def test_main_names_a_missing_rouge_score_of_a_prediction(tmp_path, monkeypatch):
    write_inputs(tmp_path)
    rows = [{**row, "scores": {"rougeL": 0.5}} if row["id"] == "c" else row for row in BASELINE_ROWS]
    (tmp_path / "data" / "predictions" / "baseline.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    monkeypatch.chdir(tmp_path)

    with pytest.raises(PipelineError, match=r"baseline.jsonl:3: missing scores.rouge1, scores.rouge2, "
                                            r"scores.rougeLsum; re-run `evaluate_baseline`"):
        compare.main()


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
