"""Compare the fine-tuned adapter with the untuned base model: ROUGE gains with their 95% intervals, a plot table
and a report.

    python -m stages.compare

Reads metrics/{baseline,adapter}.json, data/predictions/{baseline,adapter}.jsonl and the training curves DVCLive
wrote under metrics/curves/; writes metrics/compare.json (ROUGE-L of both, the gain and its interval: what `dvc exp
show` compares experiments by), metrics/compare_rouge.json (`dvc plots`), metrics/compare.md (every score, its
gain's interval from a paired bootstrap over the test examples, and examples) and, beside it,
metrics/plots/rouge.png and metrics/plots/loss.png: the report's figures as PNG files, so that it reads with its
plots in any Markdown viewer, offline (`dvc plots show` draws with Vega-Lite, fetched from the web).
"""

from __future__ import annotations

import logging
from pathlib import Path

from samsum_qlora.errors import run_stage
from samsum_qlora.evaluation.charts import draw_charts, read_loss_curves
from samsum_qlora.evaluation.comparison import (
    MODELS,
    compare_metrics,
    headline,
    load_metrics,
    load_predictions,
    pick_examples,
    rouge_plot_rows,
    rounded,
)
from samsum_qlora.evaluation.report import render_report, signed
from samsum_qlora.evaluation.uncertainty import gain_intervals
from samsum_qlora.files import atomic_dir, atomic_file, write_json
from samsum_qlora.paths import COMPARE_JSON, COMPARE_PLOT, COMPARE_REPORT, REPORT_IMAGES

log = logging.getLogger(__name__)


def write_images(images: dict[str, bytes]) -> None:
    """All the report's images at once into REPORT_IMAGES, which they replace whole: no image of an earlier run
    stays."""
    with atomic_dir(REPORT_IMAGES) as tmp:
        for name, data in images.items():
            (tmp / name).write_bytes(data)


def main() -> None:
    metrics = {model: load_metrics(model) for model in MODELS}
    predictions = {model: load_predictions(model) for model in MODELS}
    comparison = {**compare_metrics(metrics["baseline"], metrics["adapter"]),
                  "interval": gain_intervals(predictions["baseline"], predictions["adapter"])}
    examples = pick_examples(predictions["baseline"], predictions["adapter"])
    images, charts = draw_charts(comparison, read_loss_curves())

    write_json(COMPARE_JSON, rounded(headline(comparison)))
    write_json(COMPARE_PLOT, rounded(rouge_plot_rows(comparison)))
    write_images(images)
    with atomic_file(COMPARE_REPORT) as f:
        f.write(render_report(comparison, examples, charts))
    log.info(
        "ROUGE-L on %d test examples: baseline %.2f, fine-tuned %.2f (%s, interval %s to %s); wrote %s",
        comparison["examples"],
        100 * comparison["baseline"]["rougeL"],
        100 * comparison["adapter"]["rougeL"],
        signed(100 * comparison["delta"]["rougeL"], 2),
        *(signed(100 * comparison["interval"]["rougeL"][end], 2) for end in ("low", "high")),
        ", ".join((COMPARE_JSON, COMPARE_PLOT, COMPARE_REPORT, *(str(Path(REPORT_IMAGES) / name) for name in images))),
    )


if __name__ == "__main__":
    run_stage(main)
