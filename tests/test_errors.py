"""How a stage reports: one error line and an exit code, and a log without library chatter."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import warnings

import pytest

from stages import errors
from stages.errors import PipelineError, run_stage


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
