"""Prepare the dialogue/summary splits: load, clean, sample, write JSONL and data metrics.

    python -m stages.prepare        # or: dvc repro prepare

`data.source` in params.yaml is a hub dataset id (loaded with `datasets.load_dataset` at `data.revision`)
or an existing local path:
- a folder with one file per split: `train.*`, `validation.*` (or `val.*`, `valid.*`, `dev.*`), `test.*`;
- a single file with a `split` column whose values are train, validation, test.
Files are `.json` (an array of objects, or one object per line), `.jsonl`, `.csv` (with a header) or
`.parquet`, UTF-8. Columns are named by `data.dialogue_column`, `data.summary_column` and the optional
`data.id_column`; without an id, one is derived from the text (`<split>-` + 12 hex digits of a SHA-256).

Text is normalised (`\\n` line endings, trailing spaces and surrounding blank space removed); unusable rows are
dropped and counted per reason in metrics/data.json (samsum_qlora/data/cleaning.py). Nothing is written unless all
three splits are usable.
"""

from __future__ import annotations

import logging
from typing import Any

from samsum_qlora import paths
from samsum_qlora.data.cleaning import clean_rows, sample_rows, split_metrics
from samsum_qlora.data.sources import SPLITS, Table, load_source
from samsum_qlora.errors import run_stage
from samsum_qlora.files import write_json, write_jsonl
from samsum_qlora.params import DataParams, load_params

logger = logging.getLogger(__name__)


def prepare(tables: dict[str, Table], data: DataParams, seed: int) -> tuple[dict[str, list[dict]], dict]:
    """Clean and sample every split; return the rows to write and the metrics."""
    outputs: dict[str, list[dict]] = {}
    metrics: dict[str, Any] = {"source": data.source}
    for split in SPLITS:
        table = tables[split]
        usable, dropped = clean_rows(table, split, data)
        wanted = getattr(data, f"{split}_samples")
        if wanted is not None and wanted > len(usable):
            logger.info("%s: %d rows asked for (data.%s_samples) but %d usable: keeping all", split, wanted,
                        split, len(usable))
        outputs[split] = sample_rows(usable, wanted, seed)
        metrics[split] = split_metrics(len(table.rows), len(usable), outputs[split], dropped)
        counts = ", ".join(f"{k}={v}" for k, v in dropped.items() if v) or "none"
        logger.info("%s: %d rows in, %d out (dropped: %s)", split, len(table.rows), len(outputs[split]),
                    counts)
    return outputs, metrics


def main() -> None:
    params = load_params()
    tables = load_source(params.data.source, params.data.revision)
    outputs, metrics = prepare(tables, params.data, params.seed)
    for split, rows in outputs.items():
        write_jsonl(paths.PREPARED_SPLIT.format(split=split), rows)
    write_json(paths.DATA_METRICS, metrics)


if __name__ == "__main__":
    run_stage(main)
