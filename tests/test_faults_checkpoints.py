"""Faults around checkpoints and writes: a damaged newest checkpoint is passed over for the older complete one, and a
full disk, in an artifact write or a checkpoint save, stops with one line that keeps the last good copy."""

from __future__ import annotations

import errno
import json
import logging
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import complete_checkpoint, stage_error_line, tokenized_project
from samsum_qlora import files
from samsum_qlora.errors import PipelineError
from samsum_qlora.training import checkpoints
from samsum_qlora.training.checkpoints import checkpoint_problem, last_checkpoint


@pytest.mark.parametrize("state", [b"", b'{"global_step": 20, "log_hist'], ids=["empty", "truncated"])
def test_a_damaged_trainer_state_is_passed_over_for_the_older_complete_checkpoint(tmp_path, caplog, state):
    older = complete_checkpoint(tmp_path / "checkpoint-10")
    newest = complete_checkpoint(tmp_path / "checkpoint-20")
    (newest / "trainer_state.json").write_bytes(state)  # the disk filled while it was being written
    with caplog.at_level(logging.WARNING):
        assert last_checkpoint(tmp_path) == str(older)
    assert [r.getMessage() for r in caplog.records] == [
        f"passed over {newest.as_posix()}, which cannot be resumed: "
        "trainer_state.json does not parse (JSONDecodeError)"]
    assert (newest / "trainer_state.json").read_bytes() == state  # nothing the user had is touched


def test_a_checkpoint_missing_its_optimizer_or_weights_is_incomplete(tmp_path, caplog):
    older = complete_checkpoint(tmp_path / "checkpoint-10")
    newest = complete_checkpoint(tmp_path / "checkpoint-20")
    assert checkpoint_problem(newest) is None
    (newest / "optimizer.pt").unlink()
    with caplog.at_level(logging.WARNING):
        assert last_checkpoint(tmp_path) == str(older)
    assert "optimizer.pt is missing or empty" in caplog.text
    (older / "adapter_model.safetensors").write_bytes(b"\x00\xff" * 50)
    (older / "rng_state.pth").write_bytes(b"")
    assert checkpoint_problem(older) == "adapter_model.safetensors does not open (SafetensorError)"
    assert last_checkpoint(tmp_path, say=False) is None
    assert checkpoint_problem(complete_checkpoint(tmp_path / "checkpoint-1", state={"log_history": []})) == (
        "trainer_state.json has no global_step")


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("write", ["json", "jsonl", "dir"])
def test_a_full_disk_in_an_atomic_write_keeps_the_previous_file(tmp_path, monkeypatch, write):
    target = tmp_path / ("adapter" if write == "dir" else "out.json")
    if write == "dir":
        target.mkdir()
        (target / "weights").write_text("previous")
    else:
        target.write_text("previous\n")

    def partly_written(obj, f, **kwargs):
        f.write("x" * 5000)
        f.flush()
        _no_space()

    monkeypatch.setattr(files.json, "dump", partly_written)
    monkeypatch.setattr(files.json, "dumps", lambda *a, **k: _no_space())
    with pytest.raises(PipelineError) as err:
        if write == "json":
            files.write_json(target, {"a": 1})
        elif write == "jsonl":
            files.write_jsonl(target, [{"a": 1}])
        else:
            with files.atomic_dir(target) as tmp:
                (tmp / "weights").write_text("new, half")
                _no_space()
    message = str(err.value)
    assert "\n" not in message
    free = files.size_text(shutil.disk_usage(tmp_path).free)
    assert re.fullmatch(
        rf"no space left on the device while writing {re.escape(target.as_posix())} "
        rf"\((more than [\d.]+ [kM]?B needed, )?[\d.]+ [kMGT]?B free in {re.escape(tmp_path.as_posix())}/\); "
        rf"the previous {re.escape(target.as_posix())} is kept unchanged; free some space and run the same command "
        r"again", message), message
    assert free.split()[-1] in message
    if write == "json":
        assert "more than 5.0 kB needed" in message
    kept = target / "weights" if write == "dir" else target
    assert kept.read_text().startswith("previous")
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]  # no temporary left


def test_a_write_error_that_is_not_a_full_disk_propagates(tmp_path, monkeypatch):
    monkeypatch.setattr(files.json, "dump", lambda *a, **k: _raise(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError, match="I/O error"):
        files.write_json(tmp_path / "out.json", {})
    assert not list(tmp_path.iterdir())


def _raise(err):
    raise err


def test_torch_unexpected_pos_counts_as_a_full_disk_only_when_space_is_short(tmp_path, monkeypatch):
    complete_checkpoint(tmp_path / "checkpoint-1")
    trainer = SimpleNamespace(args=SimpleNamespace(output_dir=str(tmp_path)), state=SimpleNamespace(global_step=2))
    cut_short = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 279040 vs 278928")
    assert checkpoints._checkpoint_write_failed(cut_short, trainer) is None  # plenty of room: another fault
    assert checkpoints._checkpoint_write_failed(RuntimeError("shape mismatch"), trainer) is None
    monkeypatch.setattr(checkpoints, "free_space", lambda folder: 10)  # less than checkpoint-1 takes
    assert checkpoints._checkpoint_write_failed(cut_short, trainer) is not None
    assert checkpoints._checkpoint_write_failed(RuntimeError("shape mismatch"), trainer) is None


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("project")
    tokenized_project(root, max_steps=3, save_steps=1, eval_steps=10)
    return root


@pytest.mark.parametrize("fault", ["enospc", "torch"])
def test_a_full_disk_while_saving_a_checkpoint_keeps_the_last_complete_one(tokenized, monkeypatch, capsys, fault):
    import torch

    from stages import train

    for made in ("models", "metrics"):
        shutil.rmtree(tokenized / made, ignore_errors=True)
    saves = []
    original = torch.save

    def save(obj, f, *args, **kwargs):
        if str(f).endswith("optimizer.pt"):
            saves.append(f)
            if len(saves) == 2:  # the second checkpoint: the disk fills halfway through optimizer.pt
                Path(f).write_bytes(b"PK\x03\x04 cut short")
                if fault == "enospc":
                    raise OSError(errno.ENOSPC, "No space left on device")
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 279040 vs 278928")
        return original(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    if fault == "torch":  # torch's message says nothing of space: the free space decides
        monkeypatch.setattr(checkpoints, "free_space", lambda folder: 1000)
    monkeypatch.chdir(tokenized)
    message = stage_error_line(capsys, train.main)
    assert re.fullmatch(
        r"error: no space left on the device while writing models/checkpoints/checkpoint-2 \(a checkpoint needs "
        r"about [\d.]+ MB, [\d.]+ [kMGT]?B free in models/checkpoints/\); it was removed and the last complete "
        r"checkpoint models/checkpoints/checkpoint-1 is kept and running again resumes from it; free some space and "
        r"run the same command again", message), message
    folder = tokenized / "models/checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-1", "run.json"]
    assert checkpoint_problem(folder / "checkpoint-1") is None
    assert json.loads((folder / "checkpoint-1/trainer_state.json").read_text())["global_step"] == 1
    assert not (tokenized / "models/adapter").exists() and not (tokenized / "metrics/train.json").exists()
