"""The comparison report (metrics/compare.md) as Markdown: the scores table, the charts and example predictions."""

from __future__ import annotations

import dataclasses
import html
import re
from collections.abc import Sequence
from pathlib import Path

from samsum_qlora.evaluation.comparison import Example
from samsum_qlora.evaluation.scoring import ROUGE_KEYS
from samsum_qlora.evaluation.uncertainty import CONFIDENCE, RESAMPLES, includes_zero
from samsum_qlora.paths import COMPARE_REPORT, REPORT_IMAGES

ROUGE_NAMES = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "rougeLsum": "ROUGE-Lsum"}
DIALOGUE_CHARS = 600
LABEL_NOTES = {
    "best": "largest ROUGE-L gain",
    "median": "median ROUGE-L gain",
    "worst": "smallest ROUGE-L gain",
}


@dataclasses.dataclass(frozen=True)
class Chart:
    """One figure of the report: its title, its image file under REPORT_IMAGES (None when there was nothing to
    draw) and a line said under it (why it is missing, or what part of it is)."""

    title: str
    image: str | None
    note: str = ""


def signed(value: float, decimals: int) -> str:
    """`value` with its sign and `decimals` decimals, never "-0.00"."""
    rounded = round(value, decimals) or 0.0
    return f"{rounded:+.{decimals}f}"


def render_report(comparison: dict, examples: list[Example], charts: Sequence[Chart] = ()) -> str:
    """The Markdown report: the metrics table, the charts (linked images, or why one is missing), then a few
    examples from both models side by side."""
    lines = [
        "# Fine-tuned adapter vs. base model",
        "",
        "ROUGE F1 with stemming, in percent, averaged over the test examples; change in percentage points.",
        "",
        f"| metric | baseline | fine-tuned | change | {CONFIDENCE:.0%} interval of the change |",
        "|---|---:|---:|---:|---:|",
    ]
    for key in ROUGE_KEYS:
        baseline, adapter, delta = (100 * comparison[part][key] for part in ("baseline", "adapter", "delta"))
        low, high = (100 * comparison["interval"][key][end] for end in ("low", "high"))
        lines.append(f"| {ROUGE_NAMES[key]} | {baseline:.2f} | {adapter:.2f} | {signed(delta, 2)} "
                     f"| {signed(low, 2)} to {signed(high, 2)} |")
    baseline, adapter, delta = (comparison[part]["gen_len_mean"] for part in ("baseline", "adapter", "delta"))
    lines += [
        f"| mean generated length | {baseline:.1f} | {adapter:.1f} | {signed(delta, 1)} | |",
        "",
        f"Test examples: {comparison['examples']}",
        "",
        *_interval_lines(comparison),
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


def _interval_lines(comparison: dict) -> list[str]:
    """What the interval means, then each score whose interval includes 0, said plainly."""
    lines = [
        f"The {CONFIDENCE:.0%} interval comes from resampling the test examples ({RESAMPLES:,} paired-bootstrap "
        "resamples, fixed seed, percentile method): it shows how far the mean change could move on another test "
        "set of this size drawn the same way. It does not cover run-to-run training noise (another seed, or on a "
        "GPU another run, trains another adapter: [how much](../docs/performance.md#repeatable-runs-and-how-much-is-"
        "noise)).",
    ]
    unclear = [key for key in ROUGE_KEYS if includes_zero(comparison["interval"][key])]
    if unclear:
        lines.append("")
        lines += [f"- {ROUGE_NAMES[key]}: the interval includes 0, so the change is not distinguishable from no "
                  "change on this test set." for key in unclear]
    return lines


def _chart_lines(charts: Sequence[Chart]) -> list[str]:
    """The Plots section: each chart as an image linked relative to the report (plots/...), so the report and its
    images move together; a chart that was not drawn is a line saying why."""
    if not charts:
        return []
    folder = Path(REPORT_IMAGES).relative_to(Path(COMPARE_REPORT).parent).as_posix()
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
