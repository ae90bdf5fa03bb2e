"""Run the pipeline on the offline profile: bundled data, tiny local model, no network, a few CPU minutes.

    python -m offline.run                 # dvc repro with offline/params.yaml laid over params.yaml
    python -m offline.run exp run -n tiny # any dvc command and its arguments

params.yaml is restored when the command ends, however it ends (a copy waits in .params.yaml.offline
until then, and is put back on the next start if the process was killed outright).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from stages.errors import PipelineError, run_stage
from stages.params import PARAMS_FILE, parse_params

OVERRIDES = Path(__file__).with_name("params.yaml")
BACKUP = Path(".params.yaml.offline")


def merge(base: dict, overrides: dict) -> dict:
    """`base` with `overrides` laid over it, section by section."""
    out = dict(base)
    for key, value in overrides.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def offline_params(params_text: str, overrides_text: str) -> dict[str, Any]:
    merged = merge(yaml.safe_load(params_text) or {}, yaml.safe_load(overrides_text) or {})
    parse_params(merged)  # fail before anything runs
    return merged


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main() -> None:
    params = Path(PARAMS_FILE)
    if BACKUP.exists():  # an earlier run was killed before it could restore params.yaml
        shutil.copyfile(BACKUP, params)
        BACKUP.unlink()
    if not params.is_file():
        raise PipelineError(f"{PARAMS_FILE} not found: run from the project root")
    original = params.read_text(encoding="utf-8")
    merged = offline_params(original, OVERRIDES.read_text(encoding="utf-8"))
    args = sys.argv[1:] or ["repro"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    signal.signal(signal.SIGTERM, _raise_interrupt)
    shutil.copyfile(params, BACKUP)
    try:
        params.write_text(
            "# Written by offline.run for this run only; the original is restored when it ends.\n"
            + yaml.safe_dump(merged, sort_keys=False, allow_unicode=True),
            encoding="utf-8",
        )
        code = subprocess.call(["dvc", *args], env=env)
    finally:
        params.write_text(original, encoding="utf-8")
        BACKUP.unlink(missing_ok=True)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    run_stage(main)
