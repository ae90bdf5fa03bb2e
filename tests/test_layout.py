"""The layout's rules (docs/architecture.md): stages/ holds only what a user runs and imports only the library; the
library and the benchmarks never import a stage; no module grows past what a reader takes in at once."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from conftest import ROOT, imported_modules

MAX_LINES = 250  # stages/ and samsum_qlora/


def modules(folder: str) -> list[Path]:
    return sorted(p for p in (ROOT / folder).rglob("*.py") if "results" not in p.parts)


def stage_imports(path: Path) -> list[str]:
    return sorted(name for name in imported_modules(path) if name == "stages" or name.startswith("stages."))


def test_no_stage_imports_a_stage():
    for path in modules("stages"):
        if path.name != "__init__.py":
            assert not stage_imports(path), f"{path.relative_to(ROOT)} imports {stage_imports(path)}"


def test_the_library_and_the_benchmarks_never_import_a_stage():
    for folder in ("samsum_qlora", "benchmarks"):
        for path in modules(folder):
            assert not stage_imports(path), f"{path.relative_to(ROOT)} imports {stage_imports(path)}"


def test_stages_holds_only_what_dvc_yaml_or_the_readme_runs():
    run = {m.group(1) for stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].values()
           if (m := re.match(r"python -m stages\.(\w+)", stage["cmd"]))}
    run |= set(re.findall(r"python -m stages\.(\w+)", (ROOT / "README.md").read_text(encoding="utf-8")))
    present = {p.stem for p in (ROOT / "stages").glob("*.py")} - {"__init__"}
    assert present == run, f"in stages/ but never run: {sorted(present - run)}; run but absent: {sorted(run - present)}"


def test_no_module_of_the_stages_or_the_library_is_overfull():
    for folder in ("stages", "samsum_qlora"):
        for path in modules(folder):
            lines = len(path.read_text(encoding="utf-8").splitlines())
            assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines: split it by concern"
