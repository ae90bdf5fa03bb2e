"""Stages run directly (`python -m stages.<name>`) in a project copy, as the benchmarks that repeat a job do: the
environment they run in and a failing stage's error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def stage_env(project: Path, compile_cache: Path) -> dict[str, str]:
    """The project's code first on the path (then what this process sees: e.g. packages installed aside), offline,
    with its own torch compile cache."""
    path = os.pathsep.join(filter(None, [str(project), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TORCHINDUCTOR_CACHE_DIR": str(compile_cache)}


def run_stage(project: Path, env: dict[str, str], *args: str) -> None:
    """`python -m <args>` in `project`; a failure raises with the end of its stderr."""
    proc = subprocess.run([sys.executable, "-m", *args], cwd=project, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
