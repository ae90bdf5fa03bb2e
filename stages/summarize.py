"""Summarize your own dialogues with the fine-tuned adapter, as evaluate_adapter does.

    python -m stages.summarize dialogue.txt                      # one dialogue (a text file); prints its summary
    python -m stages.summarize - < dialogue.txt                  # the same from standard input
    python -m stages.summarize dialogues.jsonl -o summaries.jsonl   # many: JSONL, or a JSON list, of records
    python -m stages.summarize dialogues.json --base             # the untuned base model instead, for comparison

The model, prompt (instruction and template date), generation budget and batching come from params.yaml
(model.*, quantization.*, prompt.*, eval.*) and the adapter from models/adapter/, so a summary here is the one
the evaluation would have written for the same dialogue: a dialogue too long for prompt.max_length is cut at its
end, as in training and evaluation, and the log names it. Records are objects with the dialogue under
data.dialogue_column ("dialogue"), or plain strings; an `id` (data.id_column) is kept when present. Many
dialogues are written as JSONL, one {"id", "dialogue", "summary"} per input, in input order. No network is used
when model.base_model is a local folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from samsum_qlora.errors import PipelineError, run_stage
from samsum_qlora.files import write_jsonl
from samsum_qlora.params import Params, load_params
from samsum_qlora.paths import ADAPTER

if TYPE_CHECKING:
    from samsum_qlora.evaluation.generation import Generation

log = logging.getLogger(__name__)


def read_dialogues(source: str, column: str, id_column: str) -> tuple[list[dict], bool]:
    """The dialogues to summarize, as {"id", "dialogue"} records, and whether the input held many (JSON/JSONL)."""
    name = "standard input" if source == "-" else source
    if source == "-":
        text = sys.stdin.read()
    else:
        path = Path(source)
        if not path.is_file():
            raise PipelineError(f"{source} does not exist: give a text file, a .json/.jsonl file, or - for stdin")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise PipelineError(f"{source}: not valid UTF-8 (byte {err.start}); re-save it as UTF-8") from None
    if source.endswith(".jsonl"):
        items = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    items.append((number, json.loads(line)))
                except json.JSONDecodeError as err:
                    raise PipelineError(f"{name}:{number}: not valid JSON ({err.msg}); fix that line") from None
        records = [_record(item, f"{name}:{number}", column, id_column, i) for i, (number, item) in enumerate(items)]
        many = True
    elif source.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise PipelineError(f"{name}:{err.lineno}: not valid JSON ({err.msg}); fix the file") from None
        if not isinstance(data, list):
            raise PipelineError(f"{name}: expected a JSON list of dialogues (objects with a {column!r} key, or "
                                f"strings), got a {type(data).__name__}")
        records = [_record(item, f"{name}: item {i}", column, id_column, i) for i, item in enumerate(data)]
        many = True
    else:
        records, many = [{"id": "0", "dialogue": text.strip()}], False
    if not records:
        raise PipelineError(f"{name} holds no dialogues")
    for r in records:
        if not r["dialogue"].strip():
            raise PipelineError(f"{name}: dialogue {r['id']} is empty; give the conversation text")
    return records, many


def _record(item: object, where: str, column: str, id_column: str, index: int) -> dict:
    if isinstance(item, str):
        return {"id": str(index), "dialogue": item}
    if not isinstance(item, dict) or not isinstance(item.get(column), str):
        raise PipelineError(f"{where}: expected an object with a text {column!r} key (data.dialogue_column) or a "
                            "string")
    return {"id": str(item.get(id_column, index)), "dialogue": item[column]}


def summarize(params: Params, dialogues: list[str], adapter: str | None) -> list[Generation]:
    """Greedy summaries of `dialogues` by the base model with `adapter` (None: the base alone), as evaluate does."""
    from samsum_qlora.evaluation.generation import generate_all
    from samsum_qlora.model.adapter import check_adapter

    if adapter:
        check_adapter(adapter)
    return generate_all(params, dialogues, adapter)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Summarize dialogues with the fine-tuned adapter (params.yaml's model, prompt and eval settings).")
    parser.add_argument("source", help="a text file (one dialogue), a .json list or .jsonl file (many), or - for stdin")
    parser.add_argument("-o", "--output", help="write the summaries of many dialogues here as JSONL (default: stdout)")
    parser.add_argument("--adapter", default=ADAPTER, help=f"the adapter folder (default: {ADAPTER})")
    parser.add_argument("--base", action="store_true", help="use the untuned base model, without the adapter")
    args = parser.parse_args(argv)
    params = load_params()
    records, many = read_dialogues(args.source, params.data.dialogue_column, params.data.id_column)
    generations = summarize(params, [r["dialogue"] for r in records], None if args.base else args.adapter)
    for r, g in zip(records, generations, strict=True):
        if g.prompt_shortened:
            log.warning("dialogue %s is longer than prompt.max_length (%d tokens with the prompt): only its start "
                        "was summarized", r["id"], params.prompt.max_length)
    results = [{**r, "summary": g.text} for r, g in zip(records, generations, strict=True)]
    if args.output:
        write_jsonl(args.output, results)
        log.info("%d summaries written to %s", len(results), args.output)
    elif many:
        for r in results:
            print(json.dumps(r, ensure_ascii=False, allow_nan=False))
    else:
        print(results[0]["summary"])


if __name__ == "__main__":
    run_stage(main)
