"""Stages run directly (`python -m stages.<name>`) in a project copy, as the benchmarks that repeat a job do: the
short job's params, the copy on its SAMSum-length data, the environment the stages run in and a failing stage's
error."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from benchmarks.harness.dataset import write_dataset
from offline.project import ROOT, make_project
from offline.run import merge
from samsum_qlora.params import parse_params

PROJECT_PARAMS = ROOT / "params.yaml"  # the values measured (the tests point it at the schema's defaults)
TINY_SIZES = {"train": 64, "validation": 8, "test": 16}
TINY_PARAMS = {"training": {"max_steps": 6, "logging_steps": 1, "eval_steps": 3, "save_steps": 3},
               "eval": {"max_new_tokens": 8, "batch_size": 16}}


def job_params(model_dir: Path, deterministic: bool, tiny: bool, offline: bool) -> dict[str, Any]:
    """params.yaml's values (with the offline profile's over them when `offline`) on the benchmark model: one epoch
    of the data, checkpoints every 50 steps (a resume check interrupts after the first), and the deterministic
    switch; `tiny`: a few CPU steps."""
    params = yaml.safe_load(PROJECT_PARAMS.read_text(encoding="utf-8"))
    if offline:
        params = merge(params, yaml.safe_load((ROOT / "offline/params.yaml").read_text(encoding="utf-8")))
    local = {"model": {"base_model": str(model_dir), "tokenizer_type": None},
             "training": {"deterministic": deterministic, "max_steps": -1, "save_steps": 50, "eval_steps": 50}}
    params = merge(merge(params, local), TINY_PARAMS if tiny else {})
    parse_params(params)
    return params


def job_project(params: dict[str, Any], sizes: dict[str, int], prefix: str) -> tuple[Path, Path, dict[str, Any],
                                                                                    dict[str, str]]:
    """A project copy in a new temporary folder, its params pointed at a SAMSum-length dataset of `sizes` rows
    (written with the base model's tokenizer, once per recipe): the folder, the project, its params and the
    stages' environment."""
    model_dir = params["model"]["base_model"]
    data_dir = Path(tempfile.gettempdir()) / "samsum-bench" / "samsum-{train}-{validation}-{test}".format(**sizes)
    write_dataset(data_dir, model_dir, params["prompt"]["instruction"], params["prompt"]["date_string"], sizes)
    params = merge(params, {"data": {"source": str(data_dir)}})
    work = Path(tempfile.mkdtemp(prefix=prefix))
    project = make_project(work / "project", params)
    return work, project, params, stage_env(project, work / "compile-cache")


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
