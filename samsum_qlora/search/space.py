"""A search's definition (search.yaml, or --grid on the command line): the space over params.yaml's keys, the
objective, the sampler and the pruner, validated once against the baseline's params before any trial starts."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from samsum_qlora.errors import PipelineError
from samsum_qlora.params import parse_params, yaml_number

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")  # a study name is also the prefix of git ref names


class Range(BaseModel):
    """A numeric interval: integers when low, high (and step) are integers, else floats; `log` samples its log."""

    model_config = ConfigDict(extra="forbid")
    low: float
    high: float
    log: bool = False
    step: float | None = None
    integer: bool = False

    @model_validator(mode="before")
    @classmethod
    def _kind(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and "integer" not in raw:
            numbers = [raw.get(k) for k in ("low", "high", "step") if raw.get(k) is not None]
            raw = {**raw, "integer": all(isinstance(v, int) and not isinstance(v, bool) for v in numbers)}
        return raw

    @model_validator(mode="after")
    def _bounds(self) -> Range:
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or self.low >= self.high:
            raise ValueError(f"needs finite low < high, got low {self.low:g}, high {self.high:g}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got {self.low:g}")
        if self.log and self.step is not None:
            raise ValueError("step and log cannot be combined (Optuna samples one or the other)")
        return self


class SearchSpec(BaseModel):
    """search.yaml."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, description="the study's name (default: the file's stem); prefixes its trials")
    objective: str = Field("rougeL.tuned", description="a metric of dvc.yaml's metrics files, or FILE:KEY")
    direction: Literal["maximize", "minimize"] = "maximize"
    trials: int | None = Field(None, ge=1, description="how many trials (default: the whole grid; else 20)")
    sampler: Literal["grid", "random", "tpe"] = "tpe"
    pruner: Literal["none", "median", "halving"] = "median"
    prune_after_steps: int = Field(0, ge=0, description="no trial is pruned before this optimizer step")
    startup_trials: int = Field(2, ge=0, description="median: finished trials before any is pruned")
    workers_per_gpu: int | None = Field(None, ge=1, description="trials side by side on one GPU (null: memory rule)")
    seed: int = 0
    start_with: list[dict[str, Any]] = Field([], description="trials to run first, in order (e.g. the baseline's)")
    space: dict[str, list[Any] | Range]

    @field_validator("space", mode="before")
    @classmethod
    def _ranges(cls, raw: Any) -> Any:
        # a mapping is a Range: say what is wrong with it, not that it is not a list
        if not isinstance(raw, dict):
            return raw
        out = {}
        for key, value in raw.items():
            if isinstance(value, dict):
                try:
                    value = Range.model_validate(value)
                except ValidationError as err:
                    first = err.errors()[0]
                    where = ".".join(str(p) for p in first["loc"])
                    raise ValueError(f"{key}{'.' + where if where else ''}: "
                                     f"{first['msg'].removeprefix('Value error, ')}") from None
            out[key] = value
        return out

    @model_validator(mode="after")
    def _consistent(self) -> SearchSpec:
        if not self.space:
            raise ValueError("space is empty: name at least one params.yaml key to search")
        for key, values in self.space.items():
            if isinstance(values, list) and not values:
                raise ValueError(f"space.{key} lists no values")
        if self.sampler == "grid" and any(isinstance(v, Range) for v in self.space.values()):
            ranged = [k for k, v in self.space.items() if isinstance(v, Range)]
            raise ValueError(f"the grid sampler needs lists of values, but {', '.join(ranged)} is a range")
        if self.start_with and self.sampler == "grid":
            raise ValueError("start_with is for the random and tpe samplers: a grid runs every point anyway")
        for point in self.start_with:
            if set(point) != set(self.space):
                raise ValueError(f"start_with {point} must give a value for each key of space: {', '.join(self.space)}")
        if self.name is not None and not NAME.match(self.name):
            raise ValueError(f"name {self.name!r} must be letters, digits, - and _ (it names git refs)")
        return self

    def grid_size(self) -> int | None:
        lists = [v for v in self.space.values() if isinstance(v, list)]
        return math.prod(len(v) for v in lists) if len(lists) == len(self.space) else None

    def trial_count(self) -> int:
        """The trials to run: `trials`, else the whole grid (at most the grid, for the grid sampler)."""
        grid = self.grid_size()
        if self.sampler == "grid":
            return min(self.trials or grid, grid)
        return self.trials or 20


def _scalar(text: str) -> Any:
    """A value as `-S KEY=VALUE` would read it: YAML, except that 1e-4 is a number (YAML 1.1 says a string)."""
    return yaml_number(yaml.safe_load(text) if text.strip() else text)


def _split_top_level(text: str) -> list[str]:
    """`8,16` -> [8, 16]; `[q_proj,v_proj],[q_proj,k_proj]` -> two lists: commas inside brackets stay."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [*parts, current]


def grid_spec(grid: list[str], name: str | None) -> dict[str, Any]:
    """The search.yaml mapping for `--grid KEY=V1,V2 ...`: every combination, once."""
    space: dict[str, list[Any]] = {}
    for item in grid:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise PipelineError(f"--grid {item!r}: write KEY=V1,V2,... e.g. --grid lora.r=8,16,32")
        space[key.strip()] = [_scalar(v) for v in _split_top_level(values)]
    return {"name": name or "grid", "sampler": "grid", "space": space}


def load_spec(path: str | Path | None, grid: list[str], name: str | None) -> tuple[SearchSpec, str]:
    """The search's definition from search.yaml and/or --grid (which then replaces its space and sampler)."""
    raw: dict[str, Any] = {}
    where = str(path) if path else "--grid"
    if path:
        path = Path(path)
        if not path.is_file():
            raise PipelineError(f"{path} not found: give a search.yaml (see docs/search.md) or --grid KEY=V1,V2")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise PipelineError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise PipelineError(f"{path}: must be a mapping (name, objective, space, ...), got {raw!r}")
        raw.setdefault("name", path.stem)
    if grid:
        raw = {**raw, **grid_spec(grid, raw.get("name"))}
    if name:
        raw["name"] = name
    if not raw:
        raise PipelineError("nothing to search: give a search.yaml or --grid KEY=V1,V2 (docs/search.md)")
    try:
        return SearchSpec.model_validate(raw), where
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"] if not str(p).startswith(("list[", "Range")))
        message = first["msg"].removeprefix("Value error, ")
        raise PipelineError(f"{where}: {key + ': ' if key else ''}{message}") from None


def with_value(params: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A copy of the params mapping with the dotted `key` set to `value`; the key must already be there."""
    out = copy.deepcopy(params)
    node, parts = out, key.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            section = ".".join(parts[:depth]) or "the top level"
            known = ", ".join(node) if isinstance(node, dict) else "none"
            raise PipelineError(f"space key {key} is not in params.yaml (keys of {section}: {known})")
        if depth == len(parts) - 1:
            node[part] = value
        node = node[part]
    return out


def check_space(spec: SearchSpec, where: str, params: dict[str, Any]) -> None:
    """Every value (each choice, each range's ends) must make valid params: fail here, not in trial 7."""
    for key, values in spec.space.items():
        probes = values if isinstance(values, list) else [values.low, values.high]
        probes = [*probes, *(point[key] for point in spec.start_with)]
        for value in probes:
            if isinstance(values, Range) and values.integer:
                value = int(value)
            try:
                changed = with_value(params, key, value)
            except PipelineError as err:
                raise PipelineError(f"{where}: {err}") from None
            try:
                parse_params(changed)
            except PipelineError as err:
                raise PipelineError(f"{where}: space.{key} = {value!r}: {str(err).split(': ', 1)[-1]}") from None


def dvc_value(value: Any) -> str:
    """`value` as `dvc exp run -S KEY=VALUE` writes it (Hydra's override grammar)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, list):
        return "[" + ",".join(dvc_value(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(value)
    return str(value)
