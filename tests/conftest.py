"""Shared fixtures: the offline profile's tiny model and a throwaway copy of the project as a git+DVC repo."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = Path(os.environ.get("TEST_TINY_MODEL", ROOT / "offline" / "tiny-llama"))
# What a fresh clone holds that the pipeline needs (generated outputs are left behind).
PROJECT_FILES = ["stages", "offline", "data/samples", "dvc.yaml", "params.yaml", ".dvc/config", ".dvcignore",
                 ".gitignore"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from stages.modeling import load_tokenizer
    from stages.params import ModelParams

    return load_tokenizer(ModelParams(base_model=str(TINY_MODEL), tokenizer_type=None))


def offline_params(**sections: dict) -> dict:
    """params.yaml with the offline profile laid over it, and `sections` laid over that."""
    from offline.run import merge

    params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), yaml.safe_load(
        (ROOT / "offline" / "params.yaml").read_text()))
    return merge(params, sections)


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


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
    git(dest, "-c", "user.name=test", "-c", "user.email=test@example.com", "add", "-A")
    git(dest, "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", "project")
    return dest


def dvc_env(cwd: Path, **extra: str) -> dict[str, str]:
    """The environment for dvc in a project copy: its own code first, a git identity for experiments."""
    return {**os.environ, "PYTHONPATH": str(cwd), "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "t@example.com",
            "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "t@example.com", **extra}


def run_dvc(cwd: Path, *args: str, check: bool = True, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess:
    proc = subprocess.run(["dvc", *args], cwd=cwd, env=env or dvc_env(cwd), capture_output=True, text=True)
    if check and proc.returncode:
        raise AssertionError(f"dvc {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc
