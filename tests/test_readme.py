"""The README's quick-start, run as a new user runs it: its marked command blocks, literally and in order, offline,
in a fresh clone of the project. The commands are read from README.md, so the two cannot drift."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, dvc_env, git, make_project

pytestmark = pytest.mark.slow

# A block the test runs is a fenced block directly after one of these lines.
MARKERS = {"<!-- test: run -->": "bash", "<!-- test: python -->": "python"}
BLOCK = re.compile(r"^(<!-- test: (?:run|python) -->)\n```\w*\n(.*?)^```", re.M | re.S)


def readme_blocks(text: str) -> list[tuple[str, str]]:
    """The README's marked blocks in order, as (language, code)."""
    return [(MARKERS[marker], code) for marker, code in BLOCK.findall(text)]


def test_marked_blocks_are_found_in_order_and_nothing_else():
    text = ("intro\n<!-- test: run -->\n```bash\necho one   # a comment\n```\n"
            "```bash\nnot marked\n```\n<!-- test: python -->\n```python\nprint(2)\n```\n")
    assert readme_blocks(text) == [("bash", "echo one   # a comment\n"), ("python", "print(2)\n")]


def commands(blocks: list[tuple[str, str]]) -> str:
    return "\n".join(code for _, code in blocks)


def test_readme_quickstart_runs_as_written_offline(tmp_path):
    blocks = readme_blocks((ROOT / "README.md").read_text(encoding="utf-8"))
    text = commands(blocks)
    # What the quick-start promises a newcomer, in this order; each must be one of the commands the test runs.
    promised = ["python -m offline.run", "python -m stages.summarize dialogue.txt", "python -m stages.summarize ",
                "python -m stages.export", "git checkout params.yaml"]
    positions = [text.find(command) for command in promised]
    assert -1 not in positions, f"README's marked blocks lack {promised[positions.index(-1)]!r}"
    assert positions == sorted(positions), "the README runs `git checkout params.yaml` before using the result"
    assert any(language == "python" for language, _ in blocks)

    repo = make_project(tmp_path / "clone", {})
    (repo / "params.yaml").write_text(git(ROOT, "show", "HEAD:params.yaml"))  # the committed default job
    git(repo, "commit", "-qam", "the default job")
    default = (repo / "params.yaml").read_text(encoding="utf-8")
    # Offline as on the machine of a user with no network: nothing may reach the hub.
    env = {**dvc_env(repo), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]), "PAGER": "cat"}
    outputs = []
    for number, (language, code) in enumerate(blocks, 1):
        command = ["bash", "-euo", "pipefail", "-c", code] if language == "bash" else [sys.executable, "-c", code]
        proc = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, f"README block {number} ({language}) failed:\n{code}\n{proc.stdout}\n{proc.stderr}"
        assert "Traceback" not in proc.stderr, f"README block {number}:\n{proc.stderr}"
        outputs.append(proc.stdout)

    # The adapter summarized the dialogue file, the JSONL file (-o) and, through plain peft, the snippet's dialogue.
    written = re.findall(r"python -m stages\.summarize \S+ -o (\S+)", text)
    assert written, "the README summarizes no JSONL file into an output file"
    rows = [json.loads(line) for name in written for line in (repo / name).read_text().splitlines()]
    assert rows and all(set(row) == {"id", "dialogue", "summary"} and row["summary"].strip() for row in rows)
    assert (repo / "models/merged/config.json").is_file() and (repo / "models/merged/model.safetensors").is_file()
    # The export was checked against the evaluation: its default 64 rows, or the whole test split when smaller.
    check = json.loads((repo / "models/merged/export_check.json").read_text())
    evaluated = (repo / "data/predictions/adapter.jsonl").read_text().splitlines()
    assert check["passed"] and check["examples"] == min(64, len(evaluated)), check
    for (language, _), output in zip(blocks, outputs, strict=True):
        if language == "python":
            assert output.strip(), "the README's Python snippet printed no summary"
    # The last step returned the workspace to the default job.
    assert (repo / "params.yaml").read_text(encoding="utf-8") == default
