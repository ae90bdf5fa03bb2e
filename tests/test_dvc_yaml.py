"""dvc.yaml tells the truth: each stage depends on exactly the project modules it runs (its import closure), so a
change to any of them re-runs the stage and a change to anything else does not."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from conftest import ROOT, imported_modules

PACKAGES = ("samsum_qlora", "stages")


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """The file of a project module `a.b.c` (a module or a package), None if it is not the project's."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = root.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def closure(module: str, root: Path = ROOT) -> set[str]:
    """The project files that running `python -m module` executes: the module, what it imports, transitively, and
    the `__init__.py` of every package on the way."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__.py and a/b/__init__.py first
            path = module_file(".".join(parts[:depth]), root)
            if path is None or path in seen:
                continue
            seen.add(path)
            todo.extend(imported_modules(path))
    return {path.relative_to(root).as_posix() for path in seen}


def stage_modules(dvc: dict) -> dict[str, str]:
    """{stage: the module its command runs}."""
    out = {}
    for name, stage in dvc["stages"].items():
        match = re.match(r"python -m ([\w.]+)", stage["cmd"])
        assert match, f"dvc.yaml: stage {name} does not run `python -m <module>`: {stage['cmd']}"
        out[name] = match.group(1)
    return out


def test_each_stage_depends_on_exactly_its_import_closure():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    for name, module in stage_modules(dvc).items():
        listed = {str(dep) for dep in dvc["stages"][name]["deps"] if str(dep).endswith(".py")}
        imported = closure(module)
        assert listed == imported, (f"dvc.yaml stage {name}: add {sorted(imported - listed)}, "
                                    f"remove {sorted(listed - imported)}")


def test_the_closure_follows_lazy_imports_packages_and_from_imports(tmp_path):
    (tmp_path / "stages").mkdir()
    (tmp_path / "samsum_qlora" / "model").mkdir(parents=True)
    files = {
        "stages/__init__.py": "import samsum_qlora\n",
        "stages/one.py": "import json\nfrom samsum_qlora.model import loading\n\ndef main():\n"
                         "    from samsum_qlora import files\n",
        "stages/two.py": "",
        "samsum_qlora/__init__.py": "",
        "samsum_qlora/files.py": "import os\n",
        "samsum_qlora/paths.py": "",
        "samsum_qlora/model/__init__.py": "",
        "samsum_qlora/model/loading.py": "from samsum_qlora.paths import ADAPTER\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    assert closure("stages.one", tmp_path) == set(files) - {"stages/two.py"}
