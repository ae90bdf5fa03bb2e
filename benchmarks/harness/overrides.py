"""The `--set KEY=VALUE` overrides the benchmarks apply to params.yaml's values."""

from __future__ import annotations

from typing import Any

import yaml


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """['training.padding_free=true'] -> {'training': {'padding_free': True}} (values read as YAML)."""
    nested: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set takes KEY=VALUE, got {pair!r}")
        *sections, leaf = key.split(".")
        node = nested
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = yaml.safe_load(value)
    return nested
