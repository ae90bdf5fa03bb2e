"""A SAMSum-size dialogue–summary dataset written as local files, with SAMSum's token lengths, made offline.

    python -m benchmarks.harness.dataset --out /tmp/samsum-bench/samsum-size [--train-rows 14732] [--tokenizer DIR]

The experiment-loop benchmark (benchmarks/bench_loop.py) feeds the pipeline through DVC, so it needs text, not
token ids: rows {"id", "dialogue", "summary"} in `data.source` format, as many as SAMSum has (14,732 train,
818 validation, 819 test). The text is the bundled dataset's synthetic chat (offline/build_dataset.py): each
row strings together scenes of that generator until its length through the chat template reaches a target
drawn from benchmarks/harness/lengths.py (log-normal, mean 214 tokens, clipped to [60, 512]; the summary about 15 %
of it), counted with the benchmark's tokenizer (the offline profile's), so the pipeline trains on as many
tokens per example, as unevenly spread, as it does on SAMSum with Llama 3.2's tokenizer. The summary is the
summaries of the row's first scenes, the dialogue as many of their lines as fit.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from benchmarks.harness.lengths import SAMSUM, length_summary, sample_lengths
from offline.build_dataset import dumps_split, make_example
from samsum_qlora.data.prompt import summary_token_mask

log = logging.getLogger(__name__)

SAMSUM_SIZES = {"train": 14732, "validation": 818, "test": 819}
MARKER = "samsum_size.json"  # what was written, so a matching folder is reused instead of rewritten
POOL = 6000  # scenes to draw from; rows combine several, so they almost never repeat
VERSION = 1  # of the composition below: a folder written by another version is rewritten


@dataclass(frozen=True)
class Recipe:
    """What a dataset folder was written from: a folder with the same recipe is reused."""

    version: int
    sizes: dict[str, int]
    seed: int
    instruction: str
    date_string: str
    tokenizer_size: int
    chat_template: str | None


@dataclass(frozen=True)
class Scene:
    """One scene of the bundled generator: its lines and summary, with their token counts."""

    lines: list[str]
    line_tokens: list[int]
    summary: str
    summary_tokens: int


def template_overhead(tokenizer: PreTrainedTokenizerBase, instruction: str, date_string: str) -> int:
    """Tokens the chat template and the instruction add to a dialogue's and a summary's own tokens."""
    dialogue, summary = "Anna: hi\nTom: hello", "Anna greets Tom."
    ids, _ = summary_token_mask(tokenizer, instruction, dialogue, summary, date_string)
    own = tokenizer([dialogue, summary], add_special_tokens=False)["input_ids"]
    return len(ids) - len(own[0]) - len(own[1])


def scene_pool(tokenizer: PreTrainedTokenizerBase, n: int, seed: int) -> list[Scene]:
    """`n` scenes of offline/build_dataset.py, each line and summary counted in tokens (one batched call)."""
    rng = random.Random(seed)
    raw = [make_example(rng) for _ in range(n)]
    lines = [dialogue.split("\n") for dialogue, _ in raw]
    flat = tokenizer([line for scene in lines for line in scene] + [s for _, s in raw],
                     add_special_tokens=False)["input_ids"]
    counts = [len(ids) for ids in flat]
    scenes, at = [], 0
    for scene_lines, (_, summary), summary_count in zip(lines, raw, counts[-n:], strict=True):
        scenes.append(Scene(scene_lines, counts[at : at + len(scene_lines)], summary, summary_count))
        at += len(scene_lines)
    return scenes


def join_costs(tokenizer: PreTrainedTokenizerBase, scenes: list[Scene]) -> tuple[float, float]:
    """Mean tokens a newline between two lines and a space between two summaries add (merges make it < 1)."""
    sample = scenes[:500]
    dialogues = tokenizer(["\n".join(s.lines) for s in sample], add_special_tokens=False)["input_ids"]
    newline = sum(len(ids) - sum(s.line_tokens) for ids, s in zip(dialogues, sample, strict=True))
    pairs = list(zip(sample[::2], sample[1::2], strict=False))
    joined = tokenizer([a.summary + " " + b.summary for a, b in pairs], add_special_tokens=False)["input_ids"]
    space = sum(len(ids) - a.summary_tokens - b.summary_tokens for ids, (a, b) in zip(joined, pairs, strict=True))
    return newline / max(1, sum(len(s.lines) - 1 for s in sample)), space / max(1, len(pairs))


def compose(
    scenes: list[Scene], picks: np.ndarray, total: int, summary: int, overhead: int, costs: tuple[float, float]
) -> tuple[str, str]:
    """A row of about `total` template tokens from the scenes `picks` names, about `summary` of them summary."""
    newline, space = costs
    chosen: list[Scene] = []
    summary_texts: list[str] = []
    summary_count = 0.0
    for i in picks:  # whole summaries, as many as come closest to the target (at least one)
        scene = scenes[i]
        more = summary_count + scene.summary_tokens + space
        if summary_texts and abs(more - summary) >= abs(summary_count - summary):
            break
        summary_count = more if summary_texts else scene.summary_tokens
        summary_texts.append(scene.summary)
        chosen.append(scene)
    budget = total - overhead - summary_count
    lines: list[str] = []
    count = -newline  # n lines join with n - 1 newlines
    for scene in chosen + [scenes[i] for i in picks[len(chosen):]]:
        for line, tokens in zip(scene.lines, scene.line_tokens, strict=True):
            if lines and abs(count + tokens + newline - budget) >= abs(count - budget):
                return "\n".join(lines), " ".join(summary_texts)
            lines.append(line)
            count += tokens + newline
    return "\n".join(lines), " ".join(summary_texts)


def build_splits(
    tokenizer: PreTrainedTokenizerBase,
    instruction: str,
    date_string: str,
    sizes: dict[str, int] = SAMSUM_SIZES,
    seed: int = 0,
) -> dict[str, list[dict[str, str]]]:
    """Rows per split, their lengths through `tokenizer`'s chat template drawn from lengths.SAMSUM."""
    overhead = template_overhead(tokenizer, instruction, date_string)
    scenes = scene_pool(tokenizer, POOL, seed)
    costs = join_costs(tokenizer, scenes)
    rng = np.random.default_rng([seed, 2])
    splits: dict[str, list[dict[str, str]]] = {}
    for number, (split, size) in enumerate(sizes.items()):
        rows = []
        for total, summary in sample_lengths(size, seed + number, SAMSUM):
            picks = rng.integers(0, len(scenes), 40)  # far more than the longest row needs
            dialogue, text = compose(scenes, picks, total, summary, overhead, costs)
            rows.append({"id": f"{split}-{len(rows):05d}", "dialogue": dialogue, "summary": text})
        splits[split] = rows
    return splits


def template_lengths(
    tokenizer: PreTrainedTokenizerBase, rows: list[dict[str, str]], instruction: str, date_string: str
) -> dict[str, float]:
    """Token lengths of `rows` through the chat template, as stages.tokenize_mask renders them (before shortening)."""
    lengths, summaries = [], []
    for row in rows:
        ids, mask = summary_token_mask(tokenizer, instruction, row["dialogue"], row["summary"], date_string)
        lengths.append(len(ids))
        summaries.append(sum(mask))
    return {
        "rows": len(rows),
        **length_summary(lengths),
        "summary_token_fraction": round(sum(summaries) / sum(lengths), 4),
        "dialogue_chars_mean": round(statistics.fmean(len(r["dialogue"]) for r in rows), 1),
        "summary_chars_mean": round(statistics.fmean(len(r["summary"]) for r in rows), 1),
    }


def write_dataset(
    out_dir: str | Path,
    tokenizer_dir: str | Path,
    instruction: str,
    date_string: str,
    sizes: dict[str, int] = SAMSUM_SIZES,
    seed: int = 0,
) -> Path:
    """{train,validation,test}.json in `out_dir` (a folder already holding the same recipe is reused)."""
    out_dir = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), trust_remote_code=False)
    recipe = asdict(Recipe(VERSION, dict(sizes), seed, instruction, date_string, len(tokenizer),
                           tokenizer.chat_template))
    marker = out_dir / MARKER
    if marker.is_file() and json.loads(marker.read_text(encoding="utf-8")).get("recipe") == recipe:
        return out_dir
    splits = build_splits(tokenizer, instruction, date_string, sizes, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        (out_dir / f"{split}.json").write_text(dumps_split(rows), encoding="utf-8")
    sample = splits["train"][:2000]  # the whole split takes ~10 s to render; 2,000 rows pin the mean to ~±3
    stats = template_lengths(tokenizer, sample, instruction, date_string)
    text = json.dumps({"recipe": recipe, "train_sample": stats}, indent=2, allow_nan=False)
    marker.write_text(text + "\n", encoding="utf-8")
    log.info("wrote %s rows to %s; train sample through the template: %s", sizes, out_dir, stats)
    return out_dir


def dataset_stats(data_dir: str | Path) -> dict:
    """The lengths write_dataset measured on the train split (from its marker file)."""
    return json.loads((Path(data_dir) / MARKER).read_text(encoding="utf-8"))["train_sample"]


def main() -> None:
    """Write the SAMSum-size dataset to --out and print its train split's lengths."""
    from benchmarks.harness.shapes import default_tokenizer_dir
    from samsum_qlora.params import PromptParams

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, default=None, help="default: offline/tiny-llama")
    parser.add_argument("--train-rows", type=int, default=SAMSUM_SIZES["train"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    prompt = PromptParams()
    sizes = {**SAMSUM_SIZES, "train": args.train_rows}
    out = write_dataset(args.out, args.tokenizer or default_tokenizer_dir(), prompt.instruction, prompt.date_string,
                        sizes, args.seed)
    for key, value in dataset_stats(out).items():
        print(f"{key:>24}: {value}")


if __name__ == "__main__":
    main()
