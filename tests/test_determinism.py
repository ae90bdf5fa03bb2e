"""training.deterministic: every op of the training path has a deterministic kernel (an op without one would fail
the run), reruns and a resumed run give the same adapter, and the switch is recorded."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys

from conftest import ROOT, run_module, tokenized_project


def adapter_digest(root) -> str:
    return hashlib.sha256((root / "models/adapter/adapter_model.safetensors").read_bytes()).hexdigest()


def test_deterministic_mode_is_set_before_the_model_is_built():
    code = ("import torch, os\n"
            "from samsum_qlora.training.determinism import make_deterministic\n"
            "assert not torch.are_deterministic_algorithms_enabled()\n"
            "make_deterministic()\n"
            "import torch._inductor.config as inductor\n"
            "print(torch.are_deterministic_algorithms_enabled(), os.environ['CUBLAS_WORKSPACE_CONFIG'],\n"
            "      torch.backends.cudnn.benchmark, inductor.deterministic)\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", ":4096:8", "False", "True"]


def test_a_deterministic_run_reruns_and_resumes_to_the_same_adapter(tmp_path):
    tokenized_project(tmp_path, deterministic=True)
    run_module(tmp_path, "stages.train")
    run = json.loads((tmp_path / "metrics/train_run.json").read_text())
    assert run["deterministic"] is True and run["steps"] == 6
    first = adapter_digest(tmp_path)

    shutil.rmtree(tmp_path / "models")  # from nothing again
    run_module(tmp_path, "stages.train")
    assert adapter_digest(tmp_path) == first

    # As if killed after the checkpoint at step 3: the resumed run ends on the same weights, bit for bit.
    shutil.rmtree(tmp_path / "models/checkpoints/checkpoint-6")
    shutil.rmtree(tmp_path / "models/adapter")
    run_module(tmp_path, "stages.train")
    assert json.loads((tmp_path / "metrics/train_run.json").read_text())["resumed_from_step"] == 3
    assert adapter_digest(tmp_path) == first


def test_an_op_without_a_deterministic_kernel_stops_the_run_in_one_line(tmp_path, monkeypatch, capsys):
    from transformers import Trainer

    from conftest import stage_error_line
    from stages import train

    tokenized_project(tmp_path, deterministic=True)
    monkeypatch.chdir(tmp_path)

    def no_kernel(*args, **kwargs):  # what torch raises for such an op (here on a GPU, in the backward pass)
        raise RuntimeError("scatter_add_cuda_kernel does not have a deterministic implementation, but you set "
                           "'torch.use_deterministic_algorithms(True)'. You can turn off determinism just for this "
                           "operation, or you can use the 'warn_only=True' option, if that's acceptable for your "
                           "application.")

    monkeypatch.setattr(Trainer, "train", no_kernel)
    # Not in this test process: deterministic algorithms would stay on for the tests after it.
    monkeypatch.setattr("samsum_qlora.training.setup.make_deterministic", lambda: None)
    line = stage_error_line(capsys, train.main)
    assert line == ("error: training.deterministic: scatter_add_cuda_kernel has no deterministic kernel on this "
                    "device, so this run cannot repeat bit for bit; set training.deterministic to false (nothing was "
                    "saved)")
    assert not (tmp_path / "models/adapter").exists()
