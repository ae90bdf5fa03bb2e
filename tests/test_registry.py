"""The adapter's entry in DVC's model registry (dvc.yaml's `artifacts:`): valid for DVC and gto, and never stale."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import yaml

from conftest import ROOT, dvc_env, make_project
from samsum_qlora.evaluation.card_metadata import NAME
from samsum_qlora.params import Params

PIPELINE = yaml.safe_load((ROOT / "dvc.yaml").read_text())
READ_ARTIFACTS = """
import json
from dvc.repo import Repo
with Repo(".") as repo:
    found = repo.artifacts.read()
print(json.dumps({dvcfile: {name: a.to_dict() for name, a in entries.items()} for dvcfile, entries in found.items()}))
"""


def outputs(stage: str) -> list[str]:
    """The paths a stage of dvc.yaml writes (an entry is a path, or a path with its options)."""
    spec = PIPELINE["stages"][stage]
    return [next(iter(out)) if isinstance(out, dict) else out
            for section in ("outs", "metrics", "plots") for out in spec.get(section, [])]


def test_the_registered_model_is_what_the_train_stage_writes():
    artifact = PIPELINE["artifacts"][NAME]  # the card and the registry call the adapter by one name

    assert artifact["type"] == "model"
    assert artifact["path"] in outputs("train")
    assert artifact["meta"]["card"] in outputs("card")
    assert {"qlora", "summarization"} <= set(artifact["labels"])


def test_dvc_reads_the_entry_and_gto_registers_a_version_of_it(tmp_path):
    """In a throwaway copy of the project: DVC parses dvc.yaml with its own schema and lists the artifact, and
    gto (which `dvc artifacts get` asks for versions) registers one and lists it, all without network."""
    repo = make_project(tmp_path / "repo", dataclasses.asdict(Params()))
    env = dvc_env(repo)
    # DVC has no command that lists artifacts; its API does (in a process of its own: DVC's logging and pytest's
    # capture of stderr do not mix).
    read = subprocess.run([sys.executable, "-c", READ_ARTIFACTS], cwd=repo, env=env, check=True, capture_output=True,
                          text=True)
    listed = json.loads(read.stdout)["dvc.yaml"]
    assert listed[NAME]["path"] == "models/adapter" and listed[NAME]["type"] == "model"

    subprocess.run(["gto", "register", NAME, "--version", "v1.0.0"], cwd=repo, env=env, check=True,
                   capture_output=True)
    shown = subprocess.run(["gto", "show", "--json"], cwd=repo, env=env, check=True, capture_output=True, text=True)
    assert json.loads(shown.stdout)[NAME]["version"] == "v1.0.0"
