"""ROUGE for the pipeline: the one place it is computed, so baseline and adapter are scored identically.

F1 of rouge1/rouge2/rougeL/rougeLsum from `rouge_score` with the Porter stemmer, as fractions in [0, 1].
rougeLsum is the summary-level LCS over sentences; `rouge_score` takes sentences as newline-separated
lines, so both texts are split with `split_sentences` first (nltk's splitter would need a data download).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from samsum_qlora.errors import PipelineError

if TYPE_CHECKING:
    from rouge_score import rouge_scorer

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")

# A sentence ends at . ! or ?, optionally followed by a closing quote or bracket, then whitespace.
# Two fixed-width lookbehinds because Python's `re` does not allow a variable-width one.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"'”’)\]])\s+")


def split_sentences(text: str) -> list[str]:
    """Split text into sentences at line breaks and at `.`, `!` or `?` followed by whitespace."""
    sentences = []
    for line in text.splitlines():
        sentences.extend(part.strip() for part in _SENTENCE_END.split(line))
    return [sentence for sentence in sentences if sentence]


@functools.cache
def _scorer(keys: tuple[str, ...]) -> rouge_scorer.RougeScorer:
    # Imported on first use: nltk, which rouge_score loads, imports scipy (1.5 s), and the compare and card stages
    # read only ROUGE_KEYS.
    from nltk.stem import porter
    from rouge_score import rouge_scorer, tokenize, tokenizers

    class StemmingTokenizer(tokenizers.Tokenizer):
        """rouge_score's own tokenization with the Porter stemmer (what `use_stemmer=True` does), each word stemmed
        once: stemming is pure and three quarters of the scoring time, and a test set repeats its words."""

        def __init__(self) -> None:
            self.stem = functools.lru_cache(maxsize=2**16)(porter.PorterStemmer().stem)

        def tokenize(self, text: str) -> list[str]:
            return tokenize.tokenize(text, self)

    return rouge_scorer.RougeScorer(list(keys), tokenizer=StemmingTokenizer())


def score_pair(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE F1 of one prediction against its reference, for each of `ROUGE_KEYS`."""
    if not prediction.strip():
        # An empty summary earns nothing; stated here rather than left to the library's edge cases.
        return dict.fromkeys(ROUGE_KEYS, 0.0)
    # rouge_score's argument order is (target, prediction).
    token_level = _scorer(("rouge1", "rouge2", "rougeL")).score(reference, prediction)
    summary_level = _scorer(("rougeLsum",)).score(
        "\n".join(split_sentences(reference)), "\n".join(split_sentences(prediction))
    )
    scores = {key: float(score.fmeasure) for key, score in token_level.items()}
    scores["rougeLsum"] = float(summary_level["rougeLsum"].fmeasure)
    return {key: scores[key] for key in ROUGE_KEYS}


def score_corpus(
    predictions: Sequence[str], references: Sequence[str]
) -> tuple[list[dict[str, float]], dict[str, float]]:
    """Per-example ROUGE F1 and, for each key, its mean over the examples."""
    if len(predictions) != len(references):
        raise PipelineError(
            f"cannot score {len(predictions)} predictions against {len(references)} references: "
            "each prediction needs exactly one reference"
        )
    if not predictions:
        raise PipelineError("there is nothing to score: no predictions were given (is the test split empty?)")
    per_example = [
        score_pair(prediction, reference)
        for prediction, reference in zip(predictions, references, strict=True)
    ]
    # Mean of per-example F1: what HF `evaluate`'s rouge gives with use_aggregator=False, then averaged.
    means = {key: sum(scores[key] for scores in per_example) / len(per_example) for key in ROUGE_KEYS}
    return per_example, means
