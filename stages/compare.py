"""Compare the fine-tuned adapter with the untuned base model: ROUGE deltas, a plot table and a report.

    python -m stages.compare

Reads metrics/{baseline,adapter}.json, data/predictions/{baseline,adapter}.jsonl and the training curves DVCLive
wrote under metrics/curves/; writes metrics/compare.json (ROUGE-L of both and the gain: what `dvc exp show`
compares experiments by), metrics/compare_rouge.json (`dvc plots`), metrics/compare.md (every score, and examples)
and, beside it, metrics/plots/rouge.png and metrics/plots/loss.png: the report's figures as PNG files, so that it
reads with its plots in any Markdown viewer, offline (`dvc plots show` draws with Vega-Lite, fetched from the web).
"""

from __future__ import annotations

import csv
import dataclasses
import html
import io
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from samsum_qlora.errors import PipelineError, run_stage
from samsum_qlora.evaluation.scoring import ROUGE_KEYS
from samsum_qlora.files import atomic_dir, atomic_file, read_jsonl, write_json
from samsum_qlora.training.curves import CURVES

log = logging.getLogger(__name__)

MODELS = ("baseline", "adapter")
STAGE_OF = {"baseline": "evaluate_baseline", "adapter": "evaluate_adapter"}
METRICS_FILES = {model: Path(f"metrics/{model}.json") for model in MODELS}
PREDICTION_FILES = {model: Path(f"data/predictions/{model}.jsonl") for model in MODELS}
COMPARE_JSON = Path("metrics/compare.json")
COMPARE_PLOT = Path("metrics/compare_rouge.json")
COMPARE_REPORT = Path("metrics/compare.md")
PLOTS = COMPARE_REPORT.parent / "plots"  # the report's images; linked from it by relative paths
LOSS_IMAGE = "loss.png"
ROUGE_IMAGE = "rouge.png"
# DVCLive's tables (step, loss) of the train stage: the training loss every training.logging_steps steps, the
# validation loss every training.eval_steps steps and at the end. Either is absent when it was never logged.
LOSS_CURVES = {
    "training": Path(CURVES) / "plots" / "metrics" / "loss.tsv",
    "validation": Path(CURVES) / "plots" / "metrics" / "eval" / "loss.tsv",
}
MISSING_CURVE = {
    "training": "fewer optimizer steps than `training.logging_steps`, or training ran without dvclive",
    "validation": "no validation split, or training ran without dvclive",
}

COMPARED_KEYS = (*ROUGE_KEYS, "gen_len_mean")
ROUGE_NAMES = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "rougeLsum": "ROUGE-Lsum"}
PREDICTION_FIELDS = ("id", "dialogue", "reference", "prediction", "scores")
DIALOGUE_CHARS = 600
LABEL_NOTES = {
    "best": "largest ROUGE-L gain",
    "median": "median ROUGE-L gain",
    "worst": "smallest ROUGE-L gain",
}


@dataclasses.dataclass(frozen=True)
class Example:
    """One test example as both models summarised it, with its rank by the adapter's ROUGE-L gain."""

    label: str  # "best", "median", "worst" (or "rank i of n" when more than three are picked)
    id: str
    dialogue: str
    reference: str
    baseline_prediction: str
    adapter_prediction: str
    baseline_rouge_l: float
    adapter_rouge_l: float

    @property
    def gain(self) -> float:
        return self.adapter_rouge_l - self.baseline_rouge_l


@dataclasses.dataclass(frozen=True)
class Chart:
    """One figure of the report: its title, its image file under PLOTS (None when there was nothing to draw)
    and a line said under it (why it is missing, or what part of it is)."""

    title: str
    image: str | None
    note: str = ""


def compare_metrics(baseline: dict, adapter: dict) -> dict:
    """Both models' ROUGE and mean generation length, and the adapter's change over the baseline."""
    if baseline["examples"] != adapter["examples"]:
        raise PipelineError(
            f"the baseline was scored on {baseline['examples']} test examples and the adapter on "
            f"{adapter['examples']}: their means are not comparable; run `dvc repro` to evaluate both again"
        )
    return {
        "baseline": {key: float(baseline[key]) for key in COMPARED_KEYS},
        "adapter": {key: float(adapter[key]) for key in COMPARED_KEYS},
        "delta": {key: float(adapter[key]) - float(baseline[key]) for key in COMPARED_KEYS},
        "examples": int(adapter["examples"]),
    }


def headline(comparison: dict) -> dict:
    """What experiments are compared by (metrics/compare.json): ROUGE-L of both models and the gain, under
    names short enough for `dvc exp show` in a normal terminal; the other scores are in compare.md."""
    return {"rougeL": {"base": comparison["baseline"]["rougeL"], "tuned": comparison["adapter"]["rougeL"],
                       "gain": comparison["delta"]["rougeL"]}}


def rouge_plot_rows(comparison: dict) -> list[dict]:
    """One row per (ROUGE key, model); `bar` labels it for dvc's bar templates, which cannot group by a field."""
    return [
        {"metric": key, "model": model, "bar": f"{key} {model}", "score": comparison[model][key]}
        for key in ROUGE_KEYS
        for model in MODELS
    ]


def pick_examples(baseline_rows: list[dict], adapter_rows: list[dict], k: int = 3) -> list[Example]:
    """The examples at the top, middle and bottom (k spread evenly) of the ranking by ROUGE-L gain."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    baseline_by_id = {str(row["id"]): row for row in baseline_rows}
    adapter_by_id = {str(row["id"]): row for row in adapter_rows}
    common = baseline_by_id.keys() & adapter_by_id.keys()
    if not common:
        raise PipelineError(
            f"the baseline ({len(baseline_by_id)} ids) and adapter ({len(adapter_by_id)} ids) predictions "
            "share no example id: they were made on different test examples; run `dvc repro`"
        )
    if len(common) < max(len(baseline_by_id), len(adapter_by_id)):
        log.warning(
            "baseline has %d example ids, adapter %d, %d in common: picking examples from the common ones",
            len(baseline_by_id),
            len(adapter_by_id),
            len(common),
        )
    examples = [
        Example(
            label="",
            id=example_id,
            dialogue=adapter_by_id[example_id]["dialogue"],
            reference=adapter_by_id[example_id]["reference"],
            baseline_prediction=baseline_by_id[example_id]["prediction"],
            adapter_prediction=adapter_by_id[example_id]["prediction"],
            baseline_rouge_l=float(baseline_by_id[example_id]["scores"]["rougeL"]),
            adapter_rouge_l=float(adapter_by_id[example_id]["scores"]["rougeL"]),
        )
        for example_id in common
    ]
    ranked = sorted(examples, key=lambda example: (-example.gain, example.id))  # ties: by id
    last = len(ranked) - 1
    positions = dict.fromkeys(i * last // (k - 1) if k > 1 else 0 for i in range(k))
    return [_with_label(ranked[position], position, last) for position in positions]


def _with_label(example: Example, position: int, last: int) -> Example:
    if position == 0:
        label = "best"
    elif position == last:
        label = "worst"
    elif position == last // 2:
        label = "median"
    else:
        label = f"rank {position + 1} of {last + 1}"
    return dataclasses.replace(example, label=label)


def render_report(comparison: dict, examples: list[Example], charts: Sequence[Chart] = ()) -> str:
    """The Markdown report: the metrics table, the charts (linked images, or why one is missing), then a few
    examples from both models side by side."""
    lines = [
        "# Fine-tuned adapter vs. base model",
        "",
        "ROUGE F1 with stemming, in percent, averaged over the test examples; change in percentage points.",
        "",
        "| metric | baseline | fine-tuned | change |",
        "|---|---:|---:|---:|",
    ]
    for key in ROUGE_KEYS:
        baseline, adapter, delta = (100 * comparison[part][key] for part in ("baseline", "adapter", "delta"))
        lines.append(f"| {ROUGE_NAMES[key]} | {baseline:.2f} | {adapter:.2f} | {signed(delta, 2)} |")
    baseline, adapter, delta = (comparison[part]["gen_len_mean"] for part in ("baseline", "adapter", "delta"))
    lines += [
        f"| mean generated length | {baseline:.1f} | {adapter:.1f} | {signed(delta, 1)} |",
        "",
        f"Test examples: {comparison['examples']}",
        *_chart_lines(charts),
        "",
        "## Example predictions",
        "",
        "Test examples ranked by how much the fine-tuned model's ROUGE-L beats the baseline's: "
        "the best, the median and the worst.",
    ]
    for example in examples:
        fence = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", example.dialogue)), default=0))
        lines += [
            "",
            f"### {example.label.capitalize()}{_note(example.label)}: `{example.id}`",
            "",
            f"ROUGE-L {100 * example.baseline_rouge_l:.2f} → {100 * example.adapter_rouge_l:.2f} "
            f"({signed(100 * example.gain, 2)})",
            "",
            f"{fence}text",
            _truncate(example.dialogue, DIALOGUE_CHARS),
            fence,
            "",
            "| reference | baseline | fine-tuned |",
            "|---|---|---|",
            f"| {_cell(example.reference)} | {_cell(example.baseline_prediction)} "
            f"| {_cell(example.adapter_prediction)} |",
        ]
    return "\n".join(lines) + "\n"


def _chart_lines(charts: Sequence[Chart]) -> list[str]:
    """The Plots section: each chart as an image linked relative to the report (plots/...), so the report and its
    images move together; a chart that was not drawn is a line saying why."""
    if not charts:
        return []
    folder = PLOTS.relative_to(COMPARE_REPORT.parent).as_posix()
    lines = ["", "## Plots"]
    for chart in charts:
        if chart.image is None:
            lines += ["", f"**{chart.title}:** not drawn. {chart.note}"]
            continue
        lines += ["", f"![{chart.title}]({folder}/{chart.image})"]
        if chart.note:
            lines += ["", chart.note]
    return lines


def _note(label: str) -> str:
    return f" ({LABEL_NOTES[label]})" if label in LABEL_NOTES else ""


def signed(value: float, decimals: int) -> str:
    rounded = round(value, decimals) or 0.0  # no "-0.00"
    return f"{rounded:+.{decimals}f}"


def _truncate(text: str, limit: int) -> str:
    text = text.strip()
    if len(text) <= limit:
        return text
    cut = text[:limit]
    boundary = max(cut.rfind(" "), cut.rfind("\n"))
    if boundary > limit * 0.8:  # end on a word when one ends near the limit
        cut = cut[:boundary]
    return f"{cut.rstrip()} …"


def _cell(text: str) -> str:
    """Text made safe for one Markdown table cell: no pipes, no raw HTML, line breaks kept."""
    text = html.escape(text.strip(), quote=False).replace("|", "\\|")
    return "<br>".join(line.strip() for line in text.splitlines()) or "*(empty)*"


def _require(path: Path, model: str) -> None:
    if not path.is_file():
        raise PipelineError(
            f"{path} not found: it is written by the `{STAGE_OF[model]}` stage; run `dvc repro` first"
        )


def load_metrics(model: str) -> dict:
    path = METRICS_FILES[model]
    _require(path, model)
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise PipelineError(f"{path} is not valid JSON ({err.msg}); re-run `{STAGE_OF[model]}`") from None
    if not isinstance(metrics, dict):
        raise PipelineError(f"{path} should hold a JSON object; re-run `{STAGE_OF[model]}`")
    for key in (*COMPARED_KEYS, "examples"):
        value = metrics.get(key)
        if value is None:
            raise PipelineError(f"{path} has no `{key}`; re-run `{STAGE_OF[model]}` to rewrite it")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PipelineError(f"{path}: `{key}` is {value!r}, not a number; re-run `{STAGE_OF[model]}`")
        if key in ROUGE_KEYS and not 0 <= value <= 1:
            raise PipelineError(f"{path}: `{key}` is {value}, not a fraction in [0, 1]")
    return metrics


def _load_predictions(model: str) -> list[dict]:
    path = PREDICTION_FILES[model]
    _require(path, model)
    rows = read_jsonl(path)
    for number, row in enumerate(rows, 1):
        missing = [field for field in PREDICTION_FIELDS if field not in row]
        if "scores" in row and not (isinstance(row["scores"], dict) and "rougeL" in row["scores"]):
            missing.append("scores.rougeL")
        if missing:
            raise PipelineError(f"{path}:{number}: missing {', '.join(missing)}; re-run `{STAGE_OF[model]}`")
    return rows


def read_curve(path: Path) -> list[tuple[int, float]]:
    """The (step, loss) points of a DVCLive table, by step; none when the file is absent. A step logged twice (a
    run resumed from a checkpoint older than its last log) keeps the later value, the one the resumed run logged."""
    if not path.is_file():
        return []
    points: dict[int, float] = {}
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        columns = reader.fieldnames or []
        if not {"step", "loss"} <= set(columns):
            raise PipelineError(f"{path} has no `step` and `loss` columns (found: {', '.join(columns) or 'none'}); "
                                "re-run `dvc repro --force train` to rewrite the curves")
        for number, row in enumerate(reader, 2):
            try:
                points[int(row["step"])] = float(row["loss"])
            except (TypeError, ValueError):
                raise PipelineError(f"{path}:{number}: step {row['step']!r} and loss {row['loss']!r} should be "
                                    "numbers; re-run `dvc repro --force train` to rewrite the curves") from None
    return sorted(points.items())


def _png(figure: Any) -> bytes:
    """A matplotlib Figure as PNG bytes, drawn by the Agg canvas (no display, no pyplot state), without the
    version stamp matplotlib puts in the metadata, so the file holds the image alone."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer, metadata={"Software": None})
    return buffer.getvalue()


def _figure() -> Any:
    from matplotlib.figure import Figure  # imported here: only drawing needs it, not the stages importing this

    return Figure(figsize=(7, 4), dpi=100, layout="constrained")


def loss_png(curves: dict[str, list[tuple[int, float]]]) -> bytes:
    """Training loss (a line) and validation loss (points, logged less often) over optimizer steps."""
    figure = _figure()
    axes = figure.add_subplot()
    for name, style in (("training", {"linewidth": 1.5}), ("validation", {"marker": "o", "linewidth": 1.5})):
        if curves.get(name):
            steps, losses = zip(*curves[name], strict=True)
            axes.plot(steps, losses, label=f"{name} loss", **style)
    axes.set(title="Training and validation loss", xlabel="optimizer step",
             ylabel="loss (mean over summary tokens)")
    axes.xaxis.get_major_locator().set_params(integer=True)  # steps are whole numbers
    axes.grid(alpha=0.3)
    axes.legend()
    return _png(figure)


def rouge_png(comparison: dict) -> bytes:
    """Each ROUGE score of both models as a pair of bars, in percent, with its value on the bar."""
    figure = _figure()
    axes = figure.add_subplot()
    width = 0.38
    highest = 0.0
    for offset, model, label in ((-width / 2, "baseline", "baseline"), (width / 2, "adapter", "fine-tuned")):
        scores = [100 * comparison[model][key] for key in ROUGE_KEYS]
        bars = axes.bar([i + offset for i in range(len(ROUGE_KEYS))], scores, width, label=label)
        axes.bar_label(bars, fmt="%.2f", fontsize=8, padding=2)
        highest = max(highest, *scores)
    axes.set_xticks(range(len(ROUGE_KEYS)), [ROUGE_NAMES[key] for key in ROUGE_KEYS])
    axes.set(title=f"ROUGE F1 on {comparison['examples']} test examples", ylabel="percent",
             ylim=(0, max(1.0, 1.12 * highest)))  # from 0, with room for the labels above the tallest bar
    figure.legend(loc="outside lower center", ncols=2)  # below the axes, where no bar can be
    return _png(figure)


def draw_charts(comparison: dict, curves: dict[str, list[tuple[int, float]]]) -> tuple[dict[str, bytes], list[Chart]]:
    """The report's images (file name -> PNG bytes) and its charts; the loss chart says which curve is missing."""
    images = {ROUGE_IMAGE: rouge_png(comparison)}
    charts = [Chart("ROUGE, baseline vs fine-tuned", ROUGE_IMAGE)]
    notes = [f"No {name} loss was logged ({LOSS_CURVES[name]} is absent: {MISSING_CURVE[name]})."
             for name in LOSS_CURVES if not curves.get(name)]
    if len(notes) < len(LOSS_CURVES):
        images[LOSS_IMAGE] = loss_png(curves)
    charts.append(Chart("Training and validation loss", LOSS_IMAGE if LOSS_IMAGE in images else None, " ".join(notes)))
    return images, charts


def write_images(images: dict[str, bytes]) -> None:
    """All the report's images at once into PLOTS, which they replace whole: no image of an earlier run stays."""
    with atomic_dir(PLOTS) as tmp:
        for name, data in images.items():
            (tmp / name).write_bytes(data)


def _rounded(data: Any) -> Any:
    if isinstance(data, float):
        return round(data, 6)
    if isinstance(data, dict):
        return {key: _rounded(value) for key, value in data.items()}
    if isinstance(data, list):
        return [_rounded(value) for value in data]
    return data


def main() -> None:
    metrics = {model: load_metrics(model) for model in MODELS}
    predictions = {model: _load_predictions(model) for model in MODELS}
    comparison = compare_metrics(metrics["baseline"], metrics["adapter"])
    examples = pick_examples(predictions["baseline"], predictions["adapter"])
    images, charts = draw_charts(comparison, {name: read_curve(path) for name, path in LOSS_CURVES.items()})
    write_json(COMPARE_JSON, _rounded(headline(comparison)))
    write_json(COMPARE_PLOT, _rounded(rouge_plot_rows(comparison)))
    write_images(images)
    with atomic_file(COMPARE_REPORT) as f:
        f.write(render_report(comparison, examples, charts))
    log.info(
        "ROUGE-L on %d test examples: baseline %.2f, fine-tuned %.2f (%s); wrote %s",
        comparison["examples"],
        100 * comparison["baseline"]["rougeL"],
        100 * comparison["adapter"]["rougeL"],
        signed(100 * comparison["delta"]["rougeL"], 2),
        ", ".join(map(str, (COMPARE_JSON, COMPARE_PLOT, COMPARE_REPORT, *(PLOTS / name for name in images)))),
    )


if __name__ == "__main__":
    run_stage(main)
