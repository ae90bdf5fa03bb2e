"""The install commands the README gives: the CPU line must resolve to PyTorch's CPU-only build."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def readme_cpu_torch_command() -> list[str]:
    """The `pip install torch...` line of the README's Install section, as arguments."""
    install = ROOT.joinpath("README.md").read_text().split("## Install", 1)[1].split("\n## ", 1)[0]
    lines = [line.split("#", 1)[0].strip() for line in install.splitlines()]
    torch_lines = [line for line in lines if re.match(r"pip install .*\btorch\b", line)]
    assert len(torch_lines) == 1, f"expected one torch install line in the README's Install section: {torch_lines}"
    return shlex.split(torch_lines[0])


def test_readme_cpu_line_names_pytorchs_cpu_index():
    args = readme_cpu_torch_command()
    assert args[:2] == ["pip", "install"]
    assert args[args.index("--index-url") + 1] == CPU_INDEX


def test_ci_installs_torch_with_the_readme_line():
    ci = ROOT.joinpath(".ci", "run").read_text()
    assert " ".join(readme_cpu_torch_command()[2:]) in ci


def test_readme_cpu_line_resolves_to_a_cpu_build_without_nvidia_libraries(tmp_path):
    """What pip would install for that line, read from its report: a `+cpu` torch and no CUDA libraries.
    (No retries: where pip is configured with a local wheel folder and the index is unreachable, pip falls back
    to that folder, as CI does.)"""
    report = tmp_path / "report.json"
    args = readme_cpu_torch_command()[2:]
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                           "--retries", "0", "--timeout", "10", "--report", str(report), *args],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    resolved = {item["metadata"]["name"].lower(): item["metadata"]["version"]
                for item in json.loads(report.read_text())["install"]}
    assert resolved["torch"].endswith("+cpu"), resolved["torch"]
    assert not [name for name in resolved if name.startswith("nvidia-") or name == "triton"], sorted(resolved)


def test_a_regular_install_ships_every_module_of_the_library_and_the_stages():
    """pyproject's package discovery finds only folders with an __init__.py: one without it would be left out of a
    non-editable install, which then fails at its first import."""
    from setuptools import find_packages

    include = json.loads(re.search(r"^include = (\[.*\])$", (ROOT / "pyproject.toml").read_text(), re.M).group(1))
    found = set(find_packages(ROOT, include=include))
    for package in ("samsum_qlora", "stages"):
        folders = {p.parent.relative_to(ROOT).as_posix().replace("/", ".") for p in (ROOT / package).rglob("*.py")}
        assert folders <= found, f"folders without __init__.py: {sorted(folders - found)}"
