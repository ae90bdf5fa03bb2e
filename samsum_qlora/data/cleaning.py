"""Cleaning a split's rows: normalised text, a stable id, the reason a row cannot be used, a seeded sample, and
the statistics metrics/data.json reports of a split.

A row is dropped, and counted under the first reason in DROP_REASONS that applies, when a field is missing, not
text, not writable as UTF-8 (a lone surrogate, which JSON's `\\ud800` escapes can hold) or empty, when the dialogue
is too long, or when its id repeats an earlier kept row of the same split.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from collections.abc import Sequence
from typing import Any

from samsum_qlora.data.sources import Table, name_list
from samsum_qlora.errors import PipelineError
from samsum_qlora.params import DataParams

logger = logging.getLogger(__name__)

# SAMSum dialogues are at most a few thousand characters; a row past this is no messenger chat (a pasted
# document, a scraping error) and would only be truncated to the prompt's token budget later.
MAX_DIALOGUE_CHARS = 20_000
DROP_REASONS = (
    "dialogue_missing", "dialogue_not_text", "dialogue_invalid_unicode", "dialogue_empty",
    "summary_missing", "summary_not_text", "summary_invalid_unicode", "summary_empty",
    "dialogue_too_long", "duplicate_id",
)


def normalize_text(text: str) -> str:
    """Use `\\n` line endings, drop trailing spaces on each line and blank space around the whole text."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return "\n".join(line.rstrip() for line in lines).strip()


def derive_id(split: str, dialogue: str, summary: str) -> str:
    """A stable id from the content: the same text gets the same id on every run and machine."""
    digest = hashlib.sha256(f"{dialogue}\x00{summary}".encode()).hexdigest()
    return f"{split}-{digest[:12]}"


def encodes(text: str) -> bool:
    """Whether `text` can be written as UTF-8 (a lone surrogate cannot)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _text_or_reason(value: Any, field: str) -> tuple[str | None, str | None]:
    if value is None or (isinstance(value, float) and math.isnan(value)):  # NaN: pandas' null
        return None, f"{field}_missing"
    if not isinstance(value, str):
        return None, f"{field}_not_text"
    if not encodes(value):
        return None, f"{field}_invalid_unicode"
    text = normalize_text(value)
    return (text, None) if text else (None, f"{field}_empty")


def _given_id(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return str(int(value))
    if isinstance(value, str) and value.strip() and encodes(value):  # an id UTF-8 cannot hold is derived instead
        return value.strip()
    return None


def check_columns(table: Table, data: DataParams) -> None:
    """Fail unless the table has the dialogue and summary columns named in params."""
    for param, column in (("dialogue_column", data.dialogue_column), ("summary_column", data.summary_column)):
        if column not in table.columns:
            raise PipelineError(f"{table.origin} has no column {column!r} (columns found: "
                                f"{name_list(table.columns)}); set data.{param} to the column that "
                                f"holds it, e.g. -S data.{param}=NAME")


def clean_rows(table: Table, split: str, data: DataParams) -> tuple[list[dict[str, str]], dict[str, int]]:
    """Return the usable rows as {id, dialogue, summary} and how many were dropped for each reason."""
    check_columns(table, data)
    if data.id_column not in table.columns:
        logger.info("%s has no %r column (data.id_column): ids are derived from the text", table.origin,
                    data.id_column)
    kept: list[dict[str, str]] = []
    dropped = dict.fromkeys(DROP_REASONS, 0)
    seen: set[str] = set()
    for row in table.rows:
        dialogue, reason = _text_or_reason(row.get(data.dialogue_column), "dialogue")
        summary, summary_reason = _text_or_reason(row.get(data.summary_column), "summary")
        reason = reason or summary_reason
        if reason is None and len(dialogue) > MAX_DIALOGUE_CHARS:
            reason = "dialogue_too_long"
        if reason is None:
            row_id = _given_id(row.get(data.id_column)) or derive_id(split, dialogue, summary)
            reason = "duplicate_id" if row_id in seen else None
        if reason is not None:
            dropped[reason] += 1
            continue
        seen.add(row_id)
        kept.append({"id": row_id, "dialogue": dialogue, "summary": summary})
    if not kept:
        counts = ", ".join(f"{k}={v}" for k, v in dropped.items() if v) or "the split has no rows"
        raise PipelineError(f"the {split} split ({table.origin}) has no usable rows out of {len(table.rows)} "
                            f"({counts}); each row needs a dialogue (text, at most {MAX_DIALOGUE_CHARS:,} "
                            "characters) and a summary, neither empty nor with text UTF-8 cannot hold")
    return kept, dropped


def sample_rows(rows: list[dict[str, str]], n: int | None, seed: int) -> list[dict[str, str]]:
    """A seeded sample of `n` rows in their original order; all rows when `n` is None or too large."""
    if n is None or n >= len(rows):
        return rows
    chosen = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in chosen]


def length_stats(values: Sequence[int]) -> dict[str, float]:
    """Mean, median, 95th percentile (nearest rank) and maximum."""
    ordered = sorted(values)

    def rank(q: float) -> int:
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

    return {"mean": round(sum(ordered) / len(ordered), 1), "p50": rank(0.5), "p95": rank(0.95),
            "max": ordered[-1]}


def split_metrics(rows_in: int, usable: int, rows: list[dict[str, str]], dropped: dict[str, int]) -> dict:
    """The metrics/data.json entry of one split."""
    turns = [sum(1 for line in row["dialogue"].split("\n") if line.strip()) for row in rows]
    return {
        "rows_in": rows_in,
        "rows_usable": usable,
        "rows_out": len(rows),
        "dropped": dropped,
        "dialogue_chars": length_stats([len(row["dialogue"]) for row in rows]),
        "summary_chars": length_stats([len(row["summary"]) for row in rows]),
        "dialogue_turns_mean": round(sum(turns) / len(turns), 2),
    }
