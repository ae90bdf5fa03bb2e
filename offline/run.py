"""Switch the workspace to the offline profile and run the pipeline on it, through `dvc exp run`.

    python -m offline.run                   # the whole pipeline on the offline profile, as a DVC experiment
    python -m offline.run -n tiny           # further options go to `dvc exp run` (a name, more -S, ...)

The profile's values (offline/params.yaml) are set in params.yaml with `dvc exp run -S`, so what DVC records
is true: params.yaml, dvc.lock and the metrics agree, `dvc status` is clean afterwards, and the experiment
commands of the README work unchanged on the profile. `git checkout params.yaml` returns to the default job;
a params.yaml that held other values is first copied to .params.yaml.before-offline.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from samsum_qlora.errors import PipelineError, run_stage
from samsum_qlora.params import PARAMS_FILE, Params, parse_params

log = logging.getLogger("offline.run")

OVERRIDES = Path(__file__).with_name("params.yaml")
BACKUP = Path(".params.yaml.before-offline")


def merge(base: dict, overrides: dict) -> dict:
    """`base` with `overrides` laid over it, section by section."""
    out = dict(base)
    for key, value in overrides.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def offline_params(params_text: str, overrides_text: str) -> dict[str, Any]:
    merged = merge(yaml.safe_load(params_text) or {}, yaml.safe_load(overrides_text) or {})
    parse_params(merged)  # fail before anything runs
    return merged


def profile_over_defaults(**sections: dict) -> dict[str, Any]:
    """The params schema's defaults with the profile laid over them, and `sections` over that: the profile as the
    tests and benchmarks run it, whatever the workspace's params.yaml holds."""
    profile = yaml.safe_load(OVERRIDES.read_text(encoding="utf-8"))
    return merge(merge(dataclasses.asdict(Params()), profile), sections)


def leaves(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"a.b": value} for every value that is not a section."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def set_flags(overrides: dict) -> list[str]:
    """`-S key=value` arguments for `dvc exp run`, values written so that DVC's YAML parser reads them back."""
    flags = []
    for key, value in leaves(overrides).items():
        text = value if isinstance(value, str) else json.dumps(value, allow_nan=False)
        flags += ["-S", f"{key}={text}"]
    return flags


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m offline.run",
        description="Run the pipeline on the offline profile: the bundled synthetic dialogues (data/samples) and "
        "the tiny local Llama-architecture model (offline/tiny-llama), on CPU in a few minutes, with no network. "
        "The profile's values (offline/params.yaml) are set in params.yaml through `dvc exp run -S`, so the "
        "params DVC records are the ones that produced the results; `git checkout params.yaml` returns to the "
        "default job.",
        epilog="Any other arguments are passed to `dvc exp run`, e.g. `-n tiny` to name the experiment or "
        "`-S lora.r=16` to change a value on top of the profile.",
    )
    return parser.parse_known_args(argv)


def main() -> None:
    _, dvc_args = parse_args(sys.argv[1:])
    params = Path(PARAMS_FILE)
    if not params.is_file():
        raise PipelineError(f"{PARAMS_FILE} not found: run `python -m offline.run` from the project root")
    original, overrides_text = params.read_text(encoding="utf-8"), OVERRIDES.read_text(encoding="utf-8")
    offline_params(original, overrides_text)  # a bad value fails here, before DVC runs
    overrides = yaml.safe_load(overrides_text) or {}
    current = leaves(yaml.safe_load(original) or {})
    changed = {key: value for key, value in leaves(overrides).items() if current.get(key) != value}
    if changed:
        shutil.copyfile(params, BACKUP)
        log.info("setting %d values of the offline profile in %s (its previous content is in %s)", len(changed),
                 PARAMS_FILE, BACKUP)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    code = subprocess.call(["dvc", "exp", "run", *set_flags(overrides), *dvc_args], env=env)
    if code:
        sys.exit(code)
    log.info("%s holds the offline profile: `dvc exp run -S key=value` runs experiments on it; "
             "`git checkout %s` returns to the default job", PARAMS_FILE, PARAMS_FILE)


if __name__ == "__main__":
    run_stage(main)
