"""The params schema in words, read from its annotations and constraints: what each key accepts, the one-line
error for a rejected value (with "did you mean" for a misspelt key), and the reference page docs/params.md."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import types
import typing
from typing import Annotated, Any, Literal

import yaml
from pydantic import ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

BOUNDS = ("gt", "ge", "lt", "le")
SYMBOLS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
TYPE_NAMES = {int: "an integer", float: "a number", bool: "true/false", str: "a string"}
RANGE_ERRORS = ("greater_than", "less_than", "too_short", "string_too_short", "literal_error")


def _unwrap(tp: Any) -> tuple[Any, list[Any]]:
    """The type under Annotated[...] layers, and their constraints."""
    constraints: list[Any] = []
    while typing.get_origin(tp) is Annotated:
        tp, *extra = typing.get_args(tp)
        for item in extra:
            constraints += item.metadata if isinstance(item, FieldInfo) else [item]
    return tp, constraints


def _parts(field: FieldInfo) -> tuple[list[Any], Any, dict[str, Any]]:
    """A field's special values (null, or a literal beside a range), its core type, and its constraints by name."""
    tp, constraints = _unwrap(field.annotation)
    constraints += field.metadata
    union = typing.get_origin(tp) in (typing.Union, types.UnionType)
    specials, core = [], tp
    for member in typing.get_args(tp) if union else (tp,):
        member, extra = _unwrap(member)
        if member is type(None):
            specials.append(None)
        elif union and typing.get_origin(member) is Literal:
            specials += typing.get_args(member)
        else:
            core, constraints = member, constraints + extra
    found = {name: getattr(c, name) for c in constraints for name in (*BOUNDS, "min_length")
             if getattr(c, name, None) is not None}
    return specials, core, found


def _type_name(core: Any) -> str:
    if typing.get_origin(core) is Literal:
        return TYPE_NAMES[type(typing.get_args(core)[0])]
    if typing.get_origin(core) is list:
        item = _unwrap(typing.get_args(core)[0])[0]
        return "a list of strings" if item is str else f"a list of {_type_name(item)}"
    return TYPE_NAMES.get(core, str(core))


def _item_type(core: Any) -> Any:
    return _unwrap(typing.get_args(core)[0])[0] if typing.get_origin(core) is list else core


def _yaml(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def accepted(field: FieldInfo) -> str:
    """What a field accepts, in words: "null (all rows) or an integer > 0"."""
    specials, core, limits = _parts(field)
    words = field.json_schema_extra or {}
    if typing.get_origin(core) is Literal:
        text = "one of " + ", ".join(str(choice) for choice in typing.get_args(core))
    elif typing.get_origin(core) is list:
        text = ("a non-empty list of " if limits.get("min_length") else "a list of ") + words.get("noun", "strings")
    elif core is str:
        text = words.get("noun") or ("a non-empty string" if limits.get("min_length") else "a string")
    else:
        text = _type_name(core) + (f" of {words['unit']}" if "unit" in words else "")
        low = next((b for b in ("gt", "ge") if b in limits), None)
        high = next((b for b in ("lt", "le") if b in limits), None)
        if low and high:
            text += f" in {'(' if low == 'gt' else '['}{limits[low]}, {limits[high]}{')' if high == 'lt' else ']'}"
        elif low or high:
            text += f" {SYMBOLS[low or high]} {limits[low or high]}"
    if "note" in words:
        text += f" ({words['note']})"
    means = f" ({words['means']})" if "means" in words else ""
    return " or ".join([*(_yaml(value) + means for value in specials), text])


@functools.cache
def fields_of(schema: type) -> dict[str, FieldInfo]:
    """A schema dataclass's keys, in order, each with its type, constraints and description."""
    hints = typing.get_type_hints(schema, include_extras=True)
    return {f.name: FieldInfo.from_annotated_attribute(hints[f.name], PydanticUndefined)
            for f in dataclasses.fields(schema)}


def _step(raw: Any, part: Any) -> tuple[bool, Any]:
    if isinstance(raw, dict) and part in raw or isinstance(raw, list) and isinstance(part, int) and part < len(raw):
        return True, raw[part]
    return False, None


def _at(raw: Any, path: list[Any]) -> Any:
    for part in path:
        raw = _step(raw, part)[1]
    return raw


def _position(raw: Any, path: list[Any]) -> list[int]:
    """Where `path` is in the raw mapping, so that the first problem in the file is the one reported."""
    out = []
    for part in path:
        found, value = _step(raw, part)
        out.append((list(raw).index(part) if isinstance(raw, dict) else part) if found else len(out) + 10**6)
        raw = value
    return out


def _resolve(schema: type, loc: tuple) -> tuple[list[Any], type, FieldInfo | None, int]:
    """(path in the raw mapping, the section class, the field or None for an unknown key, depth of the field)."""
    path: list[Any] = []
    section, field, depth = schema, None, 0
    for part in loc:
        if field is not None and isinstance(part, int) and typing.get_origin(_parts(field)[1]) is list:
            path.append(part)  # an item of a list
        elif field is None or dataclasses.is_dataclass(field.annotation):
            if field is not None:
                section = field.annotation
            field = fields_of(section).get(part)
            path.append(part)
            depth = len(path)
            if field is None:
                break
        # anything else is pydantic's name for a member of a union: the same key
    return path, section, field, depth


def _name(path: list[Any]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def _is_type_error(error: dict, field: FieldInfo | None) -> bool:
    if error["type"] == "literal_error" and field is not None:
        specials, core, _ = _parts(field)
        choices = [*specials, *(typing.get_args(core) if typing.get_origin(core) is Literal else ())]
        return type(error["input"]) not in {type(choice) for choice in choices}
    return error["type"].endswith(("_type", "_parsing"))


def _shown(value: Any, core: Any) -> Any:
    """The value as the schema reads it: a number as a float, a single name as a list."""
    if core is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            return value
    return [value] if typing.get_origin(core) is list and isinstance(value, str) else value


def one_line_error(schema: type, raw: dict, err: ValidationError) -> str:
    """The first problem in `raw` (in the file's order), in one line naming the key and what it accepts."""
    problems: dict[tuple, list[dict]] = {}
    for error in err.errors():
        problems.setdefault(tuple(_resolve(schema, error["loc"])[0]), []).append(error)
    ranked = []
    for errors in problems.values():
        path, section, field, depth = _resolve(schema, errors[0]["loc"])
        type_error = all(_is_type_error(e, field) for e in errors)
        position = _position(raw, path)
        ranked.append(((position[:depth], not type_error, position[depth:]), path, section, field, depth, errors))
    _, path, section, field, depth, errors = min(ranked, key=lambda r: r[0])
    full, value = _name(path), _at(raw, path)
    if field is None:
        prefix = _name(path[:-1]) + "." if len(path) > 1 else ""
        full, names = f"{prefix}{path[-1]}", list(fields_of(section))
        close = difflib.get_close_matches(str(path[-1]), names, n=1, cutoff=0.4)
        hint = f"did you mean {prefix}{close[0]}? " if close else ""
        where = f" of {prefix.rstrip('.')}" if prefix else ""
        # A key DVC's `-S +key=value` appended stays in the file for every later run until it is removed.
        return (f"unknown key {full}; {hint}known keys{where}: {', '.join(names)}; rename or remove it in "
                f"params.yaml")
    if errors[0]["type"] in ("dataclass_type", "dataclass_args_type"):
        return f"{full} must be a mapping of keys, got {value!r}"
    core = _parts(field)[1]
    if all(_is_type_error(e, field) for e in errors):
        expected = _type_name(_item_type(core) if len(path) > depth else core)
        return f"{full} is {value!r} ({type(value).__name__}); expected {expected}"
    if any(e["type"] == "finite_number" for e in errors):  # .inf, .nan, or "inf" from the CLI
        whole = path[:depth]
        expected = accepted(field).replace("a number", "a finite number", 1)
        return f"{_name(whole)} is {_shown(_at(raw, whole), core)!r}; expected {expected}"
    if all(e["type"].startswith(RANGE_ERRORS) for e in errors):
        whole = path[:depth]
        return f"{_name(whole)} is {_shown(_at(raw, whole), core)!r}; expected {accepted(field)}"
    return f"{full} is {value!r}; {errors[0]['msg']}"


def reference_markdown(schema: type) -> str:
    """docs/params.md: one table per section, every key with its default, what it accepts and what it does."""
    lines = ["# params.yaml reference", "",
             "Generated from the schema in `samsum_qlora/params.py` by "
             "`python -m samsum_qlora.params --markdown > docs/params.md`; edit the schema, not this page.",
             "Every stage validates the whole of params.yaml when it starts; `dvc exp run -S key=value` overrides "
             "any key (lists in brackets: `-S 'lora.target_modules=[q_proj,k_proj,v_proj,o_proj]'`).", ""]
    defaults = dataclasses.asdict(schema())
    top = {name: f for name, f in fields_of(schema).items() if not dataclasses.is_dataclass(f.annotation)}
    sections = [("top level", "", top, defaults)]
    sections += [(f"`{name}`: {f.description}", f"{name}.", fields_of(f.annotation), defaults[name])
                 for name, f in fields_of(schema).items() if name not in top]
    for title, prefix, fields, values in sections:
        lines += [f"## {title}", "", "| key | default | accepts | what it does |", "|---|---|---|---|"]
        for name, f in fields.items():
            cells = [f"`{prefix}{name}`", f"`{_yaml(values[name])}`", accepted(f), f.description or ""]
            lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def reference_cli(schema: type, prog: str, description: str) -> None:
    """The schema module's command line: `--markdown` prints docs/params.md, the params reference."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--markdown", action="store_true", help="print docs/params.md, the params reference")
    if parser.parse_args().markdown:
        print(reference_markdown(schema), end="")
    else:
        parser.print_help()
