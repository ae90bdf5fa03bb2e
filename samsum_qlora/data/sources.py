"""Loading a dialogue dataset's three splits from local files or the Hugging Face hub, as plain rows.

The accepted layouts are described in stages/prepare.py. Local files are parsed here rather than by
`datasets` so that a bad file is reported with its path and line.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from samsum_qlora import hub
from samsum_qlora.errors import PipelineError

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
SPLIT_NAMES = {"train": "train", "validation": "validation", "val": "validation", "valid": "validation",
               "dev": "validation", "test": "test"}
FORMATS = (".json", ".jsonl", ".csv", ".parquet")
SPLIT_COLUMN = "split"
EMPTY_HINT = "give it rows with a dialogue and a summary, or set data.source to another path"
# Works whatever was run: `dvc repro`, `python -m stages.prepare`, or an experiment.
LOCAL_HINT = ("set `data.source: path/to/folder` in params.yaml, or `dvc exp run -S data.source=path/to/folder` "
              "for an experiment (one train/validation/test file each; see stages/prepare.py)")


# Errors name what was found, but a few names only and each shortened: data.source may point at any folder or file
# (`../../../etc`, a link to /etc/passwd named .csv), and an error must not list that folder or echo that file.
LISTED_NAMES = 5
NAME_CHARS = 40


def name_list(names: list[str], limit: int = LISTED_NAMES, width: int = NAME_CHARS) -> str:
    """At most `limit` names, each cut to `width` characters (non-printable ones escaped), then "and N more"."""
    def short(name: str) -> str:
        name = name if name.isprintable() else repr(name)[1:-1]
        return name if len(name) <= width else name[:width - 1] + "…"

    shown = ", ".join(short(str(name)) for name in names[:limit]) or "none"
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


@dataclass(frozen=True)
class Table:
    """Rows of one split, with the columns they have and where they came from (for messages)."""

    origin: str
    columns: list[str]
    rows: list[dict[str, Any]]


def decode_utf8(data: bytes, name: str) -> str:
    """Decode file contents, naming the line and byte offset of the first invalid UTF-8 sequence."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise PipelineError(f"{name}:{line}: not valid UTF-8 (byte 0x{data[err.start]:02x} at offset "
                            f"{err.start}); re-save the file as UTF-8") from None
    return text.removeprefix("\ufeff")  # a byte-order mark would glue itself to the first column name


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(key for row in rows for key in row))


def parse_jsonl(text: str, name: str) -> Table:
    """Parse JSON Lines: one object per non-blank line."""
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise PipelineError(f"{name}:{number}: not valid JSON ({err.msg}, column {err.colno})") from None
        if not isinstance(row, dict):
            raise PipelineError(f"{name}:{number}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return Table(name, _columns(rows), rows)


def parse_json(text: str, name: str) -> Table:
    """Parse a .json file: a JSON array of objects, or JSON Lines when it starts with '{'."""
    start = text.lstrip()[:1]
    if start == "{":
        return parse_jsonl(text, name)
    if start != "[":
        raise PipelineError(f"{name}: expected a JSON array of objects or one JSON object per line")
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise PipelineError(f"{name}:{err.lineno}: not valid JSON ({err.msg}, column {err.colno})") from None
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise PipelineError(f"{name}: array item {index} is {type(row).__name__}, expected an object")
    return Table(name, _columns(rows), rows)


def parse_csv(text: str, name: str) -> Table:
    """Parse CSV with a header row; every value stays a string (an empty cell is an empty string)."""
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        rows = list(reader)
        columns = list(reader.fieldnames or [])
    except csv.Error as err:
        raise PipelineError(f"{name}:{reader.line_num}: not valid CSV ({err})") from None
    return Table(name, columns, rows)


def parse_parquet(data: bytes, name: str) -> Table:
    """Parse a Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        # No thread pool: pyarrow's can abort the interpreter at exit (apache/arrow#34314); these files are small.
        table = pq.read_table(pa.BufferReader(data), use_threads=False)
    except (pa.ArrowException, OSError) as err:
        raise PipelineError(f"{name}: not a readable Parquet file ({str(err).splitlines()[0]})") from None
    return Table(name, list(table.column_names), table.to_pylist())


def read_table(path: Path) -> Table:
    """Read one local data file, choosing the parser by its extension."""
    if not path.is_file():
        raise PipelineError(f"{path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise PipelineError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(FORMATS)}")
    data = path.read_bytes()
    if suffix == ".parquet":
        if not data:
            raise PipelineError(f"{path} is empty: {EMPTY_HINT}")
        return parse_parquet(data, str(path))
    text = decode_utf8(data, str(path))
    if not text.strip():
        raise PipelineError(f"{path} is empty: {EMPTY_HINT}")
    parse = {".json": parse_json, ".jsonl": parse_jsonl, ".csv": parse_csv}[suffix]
    return parse(text, str(path))


def split_by_column(table: Table) -> dict[str, Table]:
    """Split one table into train/validation/test by its `split` column."""
    if SPLIT_COLUMN not in table.columns:
        raise PipelineError(f"{table.origin} has no {SPLIT_COLUMN!r} column (columns found: "
                            f"{name_list(table.columns)}); a single file needs one with values train, "
                            "validation, test; or use a folder with one file per split")
    groups: dict[str, list[dict[str, Any]]] = {name: [] for name in SPLITS}
    unknown = set()
    for row in table.rows:
        value = row.get(SPLIT_COLUMN)
        split = SPLIT_NAMES.get(value.strip().lower()) if isinstance(value, str) else None
        if split is None:
            unknown.add(repr(value))
        else:
            groups[split].append(row)
    if unknown:
        raise PipelineError(f"{table.origin}: unknown values in the {SPLIT_COLUMN!r} column: "
                            f"{name_list(sorted(unknown))}; expected train, validation or test")
    missing = [name for name in SPLITS if not groups[name]]
    if missing:
        found = [name for name in SPLITS if groups[name]]
        raise PipelineError(f"{table.origin} has no rows with split={missing[0]}; "
                            f"split values found: {', '.join(found) or 'none'}")
    return {name: Table(f"{table.origin} [split={name}]", table.columns, groups[name]) for name in SPLITS}


def read_local(path: Path) -> dict[str, Table]:
    """Read train/validation/test from a folder of per-split files, or from one file with a split column."""
    if path.is_file():
        return split_by_column(read_table(path))
    entries = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))
    files: dict[str, Path] = {}
    for name in entries:
        candidate = path / name
        split = SPLIT_NAMES.get(candidate.stem.lower())
        if split is None or candidate.suffix.lower() not in FORMATS or not candidate.is_file():
            continue
        if split in files:
            raise PipelineError(f"{path} has two {split} files, {files[split].name} and {name}: keep one")
        files[split] = candidate
    missing = [split for split in SPLITS if split not in files]
    if missing:
        raise PipelineError(f"{path} has no {missing[0]} file (found: {name_list(entries)}); "
                            f"expected train.*, validation.* (or val/valid/dev), test.* "
                            f"with an extension among {', '.join(FORMATS)}")
    return {split: read_table(files[split]) for split in SPLITS}


def load_hub(dataset_id: str, revision: str) -> dict[str, Table]:
    """Load train/validation/test of a hub dataset (never running remote code)."""
    import datasets

    from samsum_qlora import hub

    unavailable = hub.hub_unavailable(hub.DATASET_SWITCHES)
    try:
        if unavailable is None:
            loaded = datasets.load_dataset(dataset_id, revision=revision)
        else:  # a dataset loaded once before is in datasets' cache: use it rather than fail
            logger.info("%s: looking for %s in the local cache", unavailable, dataset_id)
            with hub.libraries_offline():
                loaded = datasets.load_dataset(dataset_id, revision=revision)
    # load_dataset raises many unrelated types (not found, offline, HTTP, gated, bad files): all end the same.
    except Exception as err:
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        if unavailable is not None:
            raise hub.unavailable_error(
                f"could not load hub dataset {dataset_id!r} at revision {revision!r} (data.source)", unavailable,
                f"it is not in the local cache ({datasets.config.HF_DATASETS_CACHE}; {type(err).__name__}: {reason})",
                LOCAL_HINT) from None
        raise PipelineError(f"could not load hub dataset {dataset_id!r} at revision {revision!r} "
                            f"({type(err).__name__}: {reason}); data.source is not an existing local path "
                            f"either; to use local files: {LOCAL_HINT}") from None
    found = {SPLIT_NAMES[name]: loaded[name] for name in loaded if name in SPLIT_NAMES}
    missing = [split for split in SPLITS if split not in found]
    if missing:
        raise PipelineError(f"hub dataset {dataset_id!r} has no {missing[0]} split "
                            f"(splits found: {name_list(list(loaded))})")
    return {split: Table(f"{dataset_id} [{split}]", list(found[split].column_names), found[split].to_list())
            for split in SPLITS}


def load_source(source: str, revision: str) -> dict[str, Table]:
    """Load the three splits named by `data.source`: an existing local path, else a hub dataset id."""
    path = Path(source).expanduser()
    if path.exists():
        logger.info("reading local data from %s", path)
        return read_local(path)
    if hub.spelled_like_path(source):
        raise PipelineError(f"data.source {source!r} does not exist; give an existing file or folder "
                            "(relative to the project root) or a hub dataset id")
    logger.info("loading hub dataset %s at revision %s", source, revision)
    return load_hub(source, revision)
