"""How a stage reports: one error line and an exit code, and a log without library chatter."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import warnings

import pytest

from conftest import ROOT, TINY_MODEL
from samsum_qlora import errors
from samsum_qlora.errors import PipelineError, run_stage


def test_a_pipeline_error_is_one_line_on_stderr_and_exit_code_1(capsys):
    def main():
        raise PipelineError("params.yaml: lora.r is 0\n  expected an integer > 0")

    with pytest.raises(SystemExit) as stop:
        run_stage(main)
    assert stop.value.code == 1
    assert capsys.readouterr().err == "error: params.yaml: lora.r is 0 expected an integer > 0\n"


def test_library_notes_are_silenced_and_progress_bars_redraw_rarely_in_log_files(monkeypatch):
    monkeypatch.setenv("TQDM_MININTERVAL", "unset")  # recorded, so the variable is restored after the test
    monkeypatch.delenv("TQDM_MININTERVAL")
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal: a log file, DVC's queue, CI
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        errors.quiet_libraries()
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6", FutureWarning,
                      stacklevel=1)
        warnings.warn("something the user should see", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something the user should see"]
    assert errors.os.environ["TQDM_MININTERVAL"] == errors.LOG_FILE_PROGRESS_INTERVAL
    assert logging.getLogger("huggingface_hub").propagate is False


def test_importing_the_stages_silences_bitsandbytes_note_about_hub_kernels():
    code = "import stages, logging; print(logging.getLogger('bitsandbytes.backends.cpu.ops').level)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(logging.ERROR)


def test_no_hub_kernel_is_fetched_or_loaded(tmp_path):
    """A stand-in `kernels` package that records any use: loading a 4-bit model and a LoRA through the stages'
    code never touches it (bitsandbytes would on CPUs with AVX-512 BF16, transformers >= 5.25 on every load)."""
    fake = tmp_path / "kernels"
    fake.mkdir()
    used = tmp_path / "used"
    (fake / "__init__.py").write_text(
        f"import pathlib\npathlib.Path({str(used)!r}).write_text('imported')\n"
        "def __getattr__(name):\n    raise AttributeError(name)\n")
    code = ("import samsum_qlora.model.loading as m, peft\n"
            "from samsum_qlora.params import ModelParams, QuantizationParams\n"
            f"model = m.load_base_model(ModelParams(base_model={str(TINY_MODEL)!r}, tokenizer_type=None),\n"
            "    QuantizationParams(), m.choose_device(QuantizationParams(), 'adamw_torch'))\n"
            "print(type(model).__name__)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "LlamaForCausalLM"
    assert not used.exists()
    assert "kernels-community" not in proc.stderr


def test_ctrl_c_is_one_line_of_its_own_after_a_progress_bar_with_the_stage_s_advice(capsys):
    from tqdm import tqdm

    def main():
        bar = tqdm(total=10, desc="train")  # cut off mid-line, as the Trainer's bar is by Ctrl-C
        bar.update(3)
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_:
        run_stage(main, on_interrupt=lambda: "run the same command again to resume from checkpoint-20")
    assert exit_.value.code == 130
    last = capsys.readouterr().err.split("\n")[-2]
    assert last == ("error: interrupted; outputs written so far are complete, the rest were not written; "
                    "run the same command again to resume from checkpoint-20")
