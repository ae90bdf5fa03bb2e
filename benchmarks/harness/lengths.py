"""Synthetic training examples whose lengths follow SAMSum rendered through a Llama 3 chat template.

    python -m benchmarks.harness.lengths [--n 14732] [--seed 0]     # prints the statistics of a sample

Throughput depends on how long the sequences are and how unevenly long (that sets the padding), not on which
token ids they hold, so the ids are random. The distribution:

- total length (prompt + summary + end of turn): log-normal with mean 214 and standard deviation 110 tokens,
  clipped to [60, 512] (mean ~213 after clipping). 214 is the mean measured on SAMSum's train split with
  Llama 3.2's chat template (as reported in the performance issue); the spread, about half the mean, follows
  SAMSum's dialogue lengths; 512 is the project's prompt.max_length (tokenize_mask shortens longer dialogues);
  60 is about the shortest example once the template's headers and the instruction are counted.
- summary share: normal with mean 0.15 and standard deviation 0.05 of the total, clipped to [0.05, 0.40], at
  least 4 tokens: about 15 % of the tokens carry loss, as in the tokenized SAMSum data.

Each example starts with BOS; its last `summary` tokens (ending with the end-of-turn id) are the labels,
every other position is -100, exactly as stages.tokenize_mask lays them out.
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100


@dataclass(frozen=True)
class SamsumLengths:
    """SAMSum's length model: total tokens log-normal and clipped, the summary a share of them."""

    mean: float = 214.0
    sd: float = 110.0
    min_length: int = 60
    max_length: int = 512
    summary_fraction: float = 0.15
    summary_fraction_sd: float = 0.05
    summary_fraction_range: tuple[float, float] = (0.05, 0.40)
    min_summary: int = 4

    def lognormal(self) -> tuple[float, float]:
        """(mu, sigma) of the log-normal with this mean and standard deviation (before clipping)."""
        sigma2 = math.log1p((self.sd / self.mean) ** 2)
        return math.log(self.mean) - sigma2 / 2, math.sqrt(sigma2)


SAMSUM = SamsumLengths()


def sample_lengths(n: int, seed: int = 0, dist: SamsumLengths = SAMSUM) -> list[tuple[int, int]]:
    """`n` (total length, summary length) pairs; the same seed gives the same pairs."""
    rng = np.random.default_rng(seed)
    mu, sigma = dist.lognormal()
    totals = np.clip(np.rint(rng.lognormal(mu, sigma, n)), dist.min_length, dist.max_length).astype(int)
    fractions = np.clip(rng.normal(dist.summary_fraction, dist.summary_fraction_sd, n), *dist.summary_fraction_range)
    summaries = np.maximum(dist.min_summary, np.rint(fractions * totals)).astype(int)
    return [(int(t), int(s)) for t, s in zip(totals, summaries, strict=True)]


def ordinary_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every id of the tokenizer that is not a special or added token (BOS, pad, headers, reserved ones)."""
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    return [i for i in range(len(tokenizer)) if i not in special]


def synthetic_examples(
    n: int,
    token_ids: Sequence[int],
    bos_id: int | None,
    end_of_turn_id: int,
    seed: int = 0,
    dist: SamsumLengths = SAMSUM,
) -> list[dict[str, list[int]]]:
    """`n` examples {input_ids, labels}: BOS, random prompt ids, random summary ids, end of turn; loss on the last."""
    rng = np.random.default_rng([seed, 1])  # a stream of its own, so the ids don't shift the lengths
    pool = np.asarray(token_ids)
    examples = []
    for total, summary in sample_lengths(n, seed, dist):
        ids = pool[rng.integers(0, len(pool), total)].tolist()
        if bos_id is not None:
            ids[0] = bos_id
        ids[-1] = end_of_turn_id
        prompt = total - summary
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return examples


def examples_for(tokenizer: PreTrainedTokenizerBase, n: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """synthetic_examples with the ids, BOS and end of turn (its EOS, <|eot_id|> in Llama 3) of `tokenizer`."""
    return synthetic_examples(n, ordinary_token_ids(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, seed)


def prompts_of(examples: Sequence[dict[str, list[int]]]) -> list[list[int]]:
    """The prompt part of each example (what evaluation would feed the model): everything before the labels."""
    return [ex["input_ids"][: sum(label == IGNORE_INDEX for label in ex["labels"])] for ex in examples]


def length_summary(lengths: Sequence[int]) -> dict[str, float]:
    """Mean, spread, median, 95th percentile and extremes of token lengths."""
    ordered = sorted(lengths)
    return {
        "length_mean": round(statistics.fmean(ordered), 1),
        "length_sd": round(statistics.pstdev(ordered), 1),
        "length_p50": ordered[len(ordered) // 2],
        "length_p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
        "length_min": ordered[0],
        "length_max": ordered[-1],
    }


def describe(examples: Sequence[dict[str, list[int]]]) -> dict[str, float]:
    """The examples' lengths and the share of their tokens that carry loss."""
    lengths = [len(ex["input_ids"]) for ex in examples]
    loss_tokens = sum(sum(label != IGNORE_INDEX for label in ex["labels"]) for ex in examples)
    return {"examples": len(lengths), **length_summary(lengths),
            "loss_token_fraction": round(loss_tokens / sum(lengths), 4)}


def main() -> None:
    """Print the statistics of a sample."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=14732, help="default: the size of SAMSum's train split")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    examples = synthetic_examples(args.n, range(10, 2000), 0, 1, args.seed)
    stats = describe(examples)
    stats["prompt_mean"] = round(statistics.fmean(len(p) for p in prompts_of(examples)), 1)
    for key, value in stats.items():
        print(f"{key:>20}: {value}")


if __name__ == "__main__":
    main()
