"""Atomic outputs: a file or folder a stage writes appears whole or not at all, whatever stops the writer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from samsum_qlora.files import atomic_dir, atomic_file, write_json, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def temporaries(folder: Path) -> list[str]:
    """Names of the temporary files/folders the atomic writers leave when they are stopped."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".tmp", ".old")))


def rows_then_failure(n: int, error: BaseException) -> Iterator[dict]:
    for i in range(n):
        yield {"id": str(i), "text": "x" * 1000}
    raise error


@pytest.mark.parametrize("error", [ValueError("bad row"), KeyboardInterrupt()], ids=["exception", "ctrl-c"])
def test_jsonl_writer_that_fails_halfway_leaves_the_previous_file(tmp_path, error):
    path = tmp_path / "out" / "train.jsonl"
    write_jsonl(path, [{"id": "old"}])
    before = path.read_bytes()
    with pytest.raises(type(error)):
        write_jsonl(path, rows_then_failure(500, error))
    assert path.read_bytes() == before
    assert temporaries(path.parent) == []


def test_failed_first_write_leaves_nothing(tmp_path):
    path = tmp_path / "metrics" / "data.json"
    with pytest.raises(TypeError):
        write_json(path, {"ok": 1, "not json": {1, 2}})
    assert list(path.parent.iterdir()) == []


def test_text_is_utf8_with_newline_line_endings(tmp_path):
    path = tmp_path / "a.jsonl"
    write_jsonl(path, [{"dialogue": "Zoë: hi\r\nJosé: 😊"}])
    assert path.read_bytes() == '{"dialogue": "Zoë: hi\\r\\nJosé: 😊"}\n'.encode()
    with atomic_file(path) as f:
        f.write("one\ntwo\n")
    assert path.read_bytes() == b"one\ntwo\n"


def test_folder_writer_that_fails_leaves_the_previous_folder(tmp_path):
    target = tmp_path / "data" / "tokenized"
    with atomic_dir(target) as tmp:
        (tmp / "train").mkdir()
        (tmp / "train" / "data.arrow").write_bytes(b"old arrow")
        (tmp / "dataset_dict.json").write_text('{"splits": ["train"]}')
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "dataset_dict.json").write_text('{"splits": ["train", "validation"]}')
        (tmp / "train").mkdir()
        (tmp / "train" / "data.arrow").write_bytes(b"half a")
        raise RuntimeError("disk full")
    assert (target / "train" / "data.arrow").read_bytes() == b"old arrow"
    assert (target / "dataset_dict.json").read_text() == '{"splits": ["train"]}'
    assert temporaries(target.parent) == []


def test_folder_writer_replaces_the_whole_folder(tmp_path):
    target = tmp_path / "adapter"
    with atomic_dir(target) as tmp:
        (tmp / "adapter_model.bin").write_bytes(b"from an older run")
    with atomic_dir(target) as tmp:
        (tmp / "adapter_model.safetensors").write_bytes(b"new")
    assert sorted(p.name for p in target.iterdir()) == ["adapter_model.safetensors"]
    assert temporaries(tmp_path) == []


def test_leftovers_of_a_killed_writer_are_removed_by_the_next_write(tmp_path):
    (tmp_path / ".data.json.k1ll3d.tmp").write_text('{"half": ')
    (tmp_path / ".tokenized.k1ll3d.tmp").mkdir()
    (tmp_path / ".tokenized.k1ll3d.tmp" / "state.json").write_text("{")
    (tmp_path / ".other.json.abc.tmp").write_text("not ours")  # another file's temporary: left alone
    write_json(tmp_path / "data.json", {"ok": True})
    with atomic_dir(tmp_path / "tokenized") as tmp:
        (tmp / "state.json").write_text("{}")
    assert temporaries(tmp_path) == [".other.json.abc.tmp"]
    assert json.loads((tmp_path / "data.json").read_text()) == {"ok": True}


def _big_source(folder: Path, rows: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    filler = "Ann: are we still on for tonight?\nBob: yes, see you at eight\n" * 30
    with (folder / "train.jsonl").open("w", encoding="utf-8") as f:
        for i in range(rows):
            f.write(json.dumps({"id": f"big-{i}", "dialogue": f"{filler}Ann: bye {i}", "summary": "They meet."}) + "\n")
    for split in ("validation", "test"):
        (folder / f"{split}.jsonl").write_text(json.dumps({"dialogue": "Ann: hi", "summary": "Hi."}) + "\n")


def test_prepare_killed_while_writing_leaves_the_previous_outputs(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    splits = ("train", "validation", "test")
    small = tmp_path / "small"
    small.mkdir()
    for split in splits:
        (small / f"{split}.jsonl").write_text(json.dumps({"dialogue": f"Ann: {split}", "summary": "Hi."}) + "\n")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"data": {"source": "small"}}))
    subprocess.run([sys.executable, "-m", "stages.prepare"], cwd=tmp_path, env=env, check=True, capture_output=True)
    outputs = [tmp_path / "metrics/data.json", *(tmp_path / f"data/prepared/{split}.jsonl" for split in splits)]
    before = {path: path.read_bytes() for path in outputs}

    _big_source(tmp_path / "big", rows=30_000)  # ~60 MB of train.jsonl: long enough to be caught writing it
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"data": {"source": "big"}}))
    prepared = tmp_path / "data" / "prepared"
    proc = subprocess.Popen([sys.executable, "-m", "stages.prepare"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list(prepared.glob(".train.jsonl.*.tmp")):
            assert proc.poll() is None, "prepare ended before it was seen writing"
            assert time.monotonic() < deadline, "prepare never started writing"
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    partial = list(prepared.glob(".train.jsonl.*.tmp"))
    assert partial, "the kill came after the file was complete"
    assert {path: path.read_bytes() for path in outputs} == before

    # The next run (here back on the small source) completes and sweeps away the killed run's temporary.
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"data": {"source": "small"}}))
    subprocess.run([sys.executable, "-m", "stages.prepare"], cwd=tmp_path, env=env, check=True, capture_output=True)
    assert temporaries(prepared) == [] and temporaries(tmp_path / "metrics") == []
    assert {path: path.read_bytes() for path in outputs} == before
