"""The report's figures as PNG files: both models' ROUGE as bars and the training curves DVCLive logged, drawn
with matplotlib so that compare.md reads with its plots in any Markdown viewer, offline (`dvc plots show` draws
with Vega-Lite, fetched from the web)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from samsum_qlora.errors import PipelineError
from samsum_qlora.evaluation.report import ROUGE_NAMES, Chart
from samsum_qlora.evaluation.scoring import ROUGE_KEYS
from samsum_qlora.paths import CURVES

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


def read_loss_curves() -> dict[str, list[tuple[int, float]]]:
    """The training and validation loss curves of the train stage (a curve never logged has no points)."""
    return {name: read_curve(path) for name, path in LOSS_CURVES.items()}


def _png(figure: Any) -> bytes:
    """A matplotlib Figure as PNG bytes, drawn by the Agg canvas (no display, no pyplot state), without the
    version stamp matplotlib puts in the metadata, so the file holds the image alone."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer, metadata={"Software": None})
    return buffer.getvalue()


def _figure() -> Any:
    from matplotlib.figure import Figure  # imported here: only drawing needs it, not the modules importing this

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
