"""Smoke test of the data-parallel scaling benchmark on CPU: one and two gloo processes, strong and weak scaling."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks import bench_scaling


def test_bench_scaling_tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the workers: two processes share the runner's cores
    # No LoRA dropout: its random draws fall on other shapes when a batch is split, and nothing else may differ
    # between one process and two in strong scaling (same sequences per step, same order, same loss divisor).
    out = bench_scaling.main(["--tiny", "--processes", "1,2", "--modes", "strong,weak", "--steps", "2", "--warmup",
                              "1", "--out", str(tmp_path / "out"), "--model-dir", str(tmp_path / "model"),
                              "--set", "lora.lora_dropout=0"])
    (path,) = (tmp_path / "out").glob("scaling-*-tiny-*.json")
    report = json.loads(path.read_text())
    assert report == json.loads(json.dumps(out)) and report["failed"] == []
    assert report["config"]["project_overrides"] == {"lora": {"lora_dropout": 0}} and "note" in report
    runs = {(r["mode"], r["processes"]): r for r in report["results"]}
    assert list(runs) == [("strong", 1), ("strong", 2), ("weak", 1), ("weak", 2)]
    for (mode, n), r in runs.items():
        assert r["tokens_per_second"] > 0 and r["timed_steps"] == 2 and math.isfinite(r["final_loss"])
        assert len(r["peak_memory_gib_per_process"]) == len(r["real_tokens_per_process"]) == n
        assert all(peak > 0 for peak in r["peak_memory_gib_per_process"]) and r["speedup"] > 0
        assert r["sequences_per_step"] == (16 if mode == "strong" else 16 * n) and r["sequences_per_process"] * n == (
            r["sequences_per_step"])
    assert runs["strong", 1]["speedup"] == runs["weak", 1]["speedup"] == 1.0
    assert runs["weak", 2]["target_speedup"] == 1.85 and runs["strong", 2]["target_speedup"] is None
    # Strong scaling: the same sequences split over two processes, so the same tokens and the same losses.
    one, two = runs["strong", 1], runs["strong", 2]
    assert two["real_tokens"] == one["real_tokens"] and two["loss_tokens"] == one["loss_tokens"]
    assert all(tokens > 0 for tokens in two["real_tokens_per_process"])
    assert two["first_loss"] == pytest.approx(one["first_loss"], abs=1e-3)
    assert two["final_loss"] == pytest.approx(one["final_loss"], abs=1e-3)


def test_process_counts_are_checked(monkeypatch: pytest.MonkeyPatch):
    assert "must divide 16" in bench_scaling.process_problem([1, 3], ["strong", "weak"])
    assert bench_scaling.process_problem([1, 3], ["weak"]) is None  # 16 per process: any count
    monkeypatch.setattr(bench_scaling.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench_scaling.torch.cuda, "device_count", lambda: 3)
    assert bench_scaling.default_processes() == [1, 2]
    assert "this machine has 3 GPUs" in bench_scaling.process_problem([1, 2, 4], ["weak"])
    monkeypatch.setattr(bench_scaling.torch.cuda, "device_count", lambda: 4)
    assert bench_scaling.default_processes() == [1, 2, 4]
    assert bench_scaling.process_problem([1, 2, 4], ["strong", "weak"]) is None
    with pytest.raises(SystemExit):
        bench_scaling.main(["--set", "training.per_device_train_batch_size=8"])
