"""Shared fixtures and helpers: the offline profile's tiny model and its params, a module's imports; the project copy
lives in offline/project.py."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import samsum_qlora  # noqa: F401  (first: keeps hub kernels out of the test process, see samsum_qlora/__init__.py)
from offline.project import dvc_env, git, make_project, run_dvc  # noqa: F401  (the tests' project copy)

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = Path(os.environ.get("TEST_TINY_MODEL", ROOT / "offline" / "tiny-llama"))


@pytest.fixture(scope="session", autouse=True)
def _transformers_logs_to_the_session_stderr() -> None:
    # transformers' logging handler binds sys.stderr when it is first configured. Made here, before any test swaps
    # sys.stderr for capsys, it writes to the session's stream; made inside such a test, it kept that test's closed
    # stream and broke every later in-process stage's warning (tests/test_faults_training.py alone showed it).
    from transformers.utils import logging as transformers_logging

    transformers_logging.get_verbosity()


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from samsum_qlora.model.loading import load_tokenizer
    from samsum_qlora.params import ModelParams

    return load_tokenizer(ModelParams(base_model=str(TINY_MODEL), tokenizer_type=None))


def offline_params(**sections: dict) -> dict:
    """The schema's defaults (the committed params.yaml, whatever the workspace's holds) with the offline profile
    laid over them, and `sections` laid over that."""
    from offline.run import profile_over_defaults

    return profile_over_defaults(**sections)


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement in `path` names, at any depth (lazy imports inside functions too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return names


def complete_checkpoint(folder: Path, state: dict | None = None) -> Path:
    """A `checkpoint-<step>` folder with every file a resume reads, made of stand-ins: enough for the checks of
    which checkpoint is complete, not for restoring one."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    step = int(folder.name.split("-")[-1])
    (folder / "trainer_state.json").write_text(json.dumps(state if state is not None else {"global_step": step}))
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (folder / name).write_bytes(b"stand-in")
    save_file({"w": torch.zeros(2)}, str(folder / "adapter_model.safetensors"))
    return folder


def stage_error_line(capsys: pytest.CaptureFixture, main) -> str:
    """Run a stage's main() as `python -m stages.<name>` runs it; it must stop with exit code 1 and exactly one
    `error:` line on stderr, which is returned."""
    from samsum_qlora.errors import run_stage

    with pytest.raises(SystemExit) as stopped:
        run_stage(main)
    assert stopped.value.code == 1
    stderr = capsys.readouterr().err
    assert stderr.count("error:") == 1 and "Traceback" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), stderr  # the last word, after whatever the log said
    return last


def run_module(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m <args>` in `cwd` with this checkout's code first on the path; it must succeed."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def tokenized_project(root: Path, **training) -> dict:
    """A project at `root` with a small offline profile prepared and tokenized; returns its params."""
    params = offline_params(
        model={"base_model": str(TINY_MODEL)},
        data={"train_samples": 48, "validation_samples": 8, "test_samples": 4},
        training={"max_steps": 6, "save_steps": 3, "eval_steps": 3, "logging_steps": 1,
                  "per_device_train_batch_size": 4, "save_total_limit": 5, **training},
    )
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "data").mkdir()
    (root / "data" / "samples").symlink_to(ROOT / "data" / "samples")
    run_module(root, "stages.prepare")
    run_module(root, "stages.tokenize_mask")
    return params


# What a run writes or reads its params from: an experiment run elsewhere must leave all of it as it was.
WORKSPACE = ["params.yaml", "dvc.lock", "metrics", "models/adapter", "data/prepared", "data/tokenized",
             "data/predictions"]


def snapshot(repo: Path) -> dict[str, bytes]:
    """Every file of the workspace that a run writes or reads its params from, by path."""
    files = {}
    for name in WORKSPACE:
        path = repo / name
        for f in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
            files[f.relative_to(repo).as_posix()] = f.read_bytes()
    return files


# The offline profile cut to a few seconds per stage, for tests of what runs experiments (DVC's queue, the search),
# not of the model; validation every 2 of 8 steps gives the search's pruner something to read.
SHORT_RUN = {
    "training": {"max_steps": 8, "logging_steps": 2, "eval_steps": 2, "save_steps": 8, "warmup_steps": 0},
    "eval": {"max_samples": 4, "max_new_tokens": 8},
}


@pytest.fixture(scope="session")
def _short_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = make_project(tmp_path_factory.mktemp("short-run") / "repo", offline_params(**SHORT_RUN))
    run_dvc(repo, "repro", env=dvc_env(repo, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"))
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "the short offline run")
    return repo


@pytest.fixture(scope="module")
def short_run(_short_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The short offline run, committed with its outputs: a clone of its own for each test module, its outputs
    checked out from the one run's DVC cache (the run happens once per session)."""
    repo = tmp_path_factory.mktemp("short-clone") / "repo"
    git(repo.parent, "clone", "--quiet", str(_short_run), str(repo))
    run_dvc(repo, "config", "--local", "cache.dir", str(_short_run / ".dvc" / "cache"))
    run_dvc(repo, "checkout", "--quiet")
    return repo

