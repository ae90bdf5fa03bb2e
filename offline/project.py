"""A throwaway copy of the project as a git + DVC repository, as a fresh clone holds it: for the end-to-end
tests and the experiment-loop benchmark, which run real DVC commands in it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# What a fresh clone holds that the pipeline needs (generated outputs are left behind).
PROJECT_FILES = ["samsum_qlora", "stages", "offline", "data/samples", "dvc.yaml", "params.yaml", ".dvc/config",
                 ".dvcignore", ".gitignore"]
IDENTITY = {"GIT_AUTHOR_NAME": "samsum-qlora", "GIT_AUTHOR_EMAIL": "samsum-qlora@localhost",
            "GIT_COMMITTER_NAME": "samsum-qlora", "GIT_COMMITTER_EMAIL": "samsum-qlora@localhost"}


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True,
                          env={**os.environ, **IDENTITY}).stdout


def make_project(dest: Path, params: dict) -> Path:
    """A copy of the project at `dest`, committed to a new git repo, with `params` as its params.yaml."""
    for name in PROJECT_FILES:
        src = ROOT / name
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, target)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git(dest, "init", "-q", "-b", "main")
    git(dest, "add", "-A")
    git(dest, "commit", "-qm", "project")
    return dest


def dvc_env(cwd: Path, **extra: str) -> dict[str, str]:
    """The environment for dvc in a project copy: its own code first on the path, a git identity for
    experiments."""
    path = os.pathsep.join(p for p in (str(cwd), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **IDENTITY, **extra}


def run_dvc(cwd: Path, *args: str, check: bool = True, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess:
    proc = subprocess.run(["dvc", *args], cwd=cwd, env=env or dvc_env(cwd), capture_output=True, text=True)
    if check and proc.returncode:
        raise AssertionError(f"dvc {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc
