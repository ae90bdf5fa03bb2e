"""Reading and atomically writing the pipeline's artifacts: a file or folder appears whole or not at all."""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from samsum_qlora.errors import PipelineError

log = logging.getLogger(__name__)
# What a saved config may hold that makes a loader with trust_remote_code=True import code from the folder or the hub:
# transformers' `auto_map` (config.json, tokenizer_config.json) and peft's `auto_mapping` (adapter_config.json).
CODE_POINTERS = {"config.json": "auto_map", "tokenizer_config.json": "auto_map", "adapter_config.json": "auto_mapping"}


def _remove_stale_temps(path: Path) -> None:
    """Remove temporaries of `path` left by a process that was killed mid-write (kill -9, power loss)."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def size_text(n: float) -> str:
    """A byte count for people: 1.2 GB, 340 kB."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def free_space(folder: str | Path) -> int:
    """Bytes free on the file system of `folder` (or of its nearest existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def disk_full(err: BaseException) -> bool:
    """Whether `err` says the disk is full: ENOSPC from Python, or the same error as a library's text (safetensors
    and other Rust or C++ writers report it as "No space left on device (os error 28)")."""
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return True
    return "No space left on device" in str(err)


def disk_full_error(path: str | Path, kept: str, needed: int | None = None) -> PipelineError:
    """The one line for a write that ran out of disk space: the file, what it needed, the space free and what was
    kept."""
    folder = Path(path).parent
    wanted = f"more than {size_text(needed)} needed, " if needed else ""
    return PipelineError(f"no space left on the device while writing {Path(path).as_posix()} ({wanted}"
                         f"{size_text(free_space(folder))} free in {folder.as_posix()}/); {kept}; "
                         "free some space and run the same command again")


def _previous_kept(path: Path) -> str:
    return f"the previous {path.as_posix()} is kept unchanged" if path.exists() else "nothing was written"


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator[Any]:
    """Open a temporary file beside `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8", newline=None if "b" in mode else "\n") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        written = os.path.getsize(tmp) if os.path.exists(tmp) else None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if disk_full(err):
            raise disk_full_error(path, _previous_kept(path), written) from None
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as err:
        written = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file()) if tmp.is_dir() else None
        shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(err):
            raise disk_full_error(path, _previous_kept(path), written) from None
        raise


def _not_utf8(path: str | Path, where: str, err: UnicodeEncodeError) -> PipelineError:
    bad = err.object[err.start:err.end].encode("unicode_escape").decode("ascii")
    return PipelineError(f"{path}{where}: text UTF-8 cannot hold ({bad}, a lone surrogate) at character {err.start}; "
                         f"nothing was written and {path} was left as it was; fix or drop that row where it came from")


def finite_or_none(data: Any) -> Any:
    """`data` with every inf/NaN float, however deep in dicts and lists, turned into None (null in JSON)."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: finite_or_none(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite_or_none(value) for value in data]
    return data


def write_json(path: str | Path, data: Any) -> None:
    """Write `data` as indented UTF-8 JSON, atomically; an inf/NaN raises ValueError (JSON has neither: null it
    with finite_or_none where null is what the file means) and the old file is kept."""
    try:
        with atomic_file(path) as f:
            json.dump(data, f, indent=2, ensure_ascii=False, allow_nan=False)
            f.write("\n")
    except UnicodeEncodeError as err:
        raise _not_utf8(path, "", err) from None


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    """Write one JSON object per line, atomically; a row UTF-8 cannot hold is named by its line and id."""
    with atomic_file(path) as f:
        for number, row in enumerate(rows, 1):
            try:
                f.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")
            except UnicodeEncodeError as err:
                row_id = row.get("id") if isinstance(row, dict) else None
                where = f":{number}" + (f" (id {str(row_id).encode('unicode_escape').decode('ascii')})"
                                        if row_id is not None else "")
                raise _not_utf8(path, where, err) from None


def drop_code_pointers(folder: str | Path, shown_as: str | Path) -> list[str]:
    """Remove custom-code pointers from the configs the project saved into `folder` (logged as `shown_as`): the
    project never ran that code, so whoever loads its output must not be led to run it."""
    dropped = []
    for name, key in CODE_POINTERS.items():
        path = Path(folder) / name
        if not path.is_file():
            continue
        config = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(config, dict) and config.get(key) is not None:
            del config[key]
            write_json(path, config)
            dropped.append(f"{name}: {key}")
    if dropped:
        log.info("%s: dropped the custom-code pointers (%s) the base named: the project did not run that code",
                 shown_as, "; ".join(dropped))
    return dropped


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a JSONL file written by this pipeline; a missing file names the stage that makes it."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path} does not exist: run `dvc repro` (or the stage that writes it) first")
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise PipelineError(
                        f"{path}:{number}: not valid JSON ({err.msg}); re-run the stage that writes it"
                    ) from None
    return rows
