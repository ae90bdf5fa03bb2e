"""Batching tokenized examples without letting padding, or a neighbouring example, carry loss or attention.

Two collators, both keeping the labels the stage computed (a collator that rebuilds labels from input_ids,
like DataCollatorForLanguageModeling, would silently train on the prompt too):
- `PadCollator` right-pads to the longest example, with an attention mask;
- `FlatCollator` (training.padding_free) lays the examples end to end in one row with position ids that
  restart at 0 for each, and their boundaries (`cu_seq_lens_*`, `max_length_*`: the keyword arguments
  transformers hands to variable-length attention, see samsum_qlora/model/attention.py). No token attends across
  examples and no compute is spent on padding. Under plain SDPA, transformers builds a block-diagonal causal
  mask from the position ids instead.
Both add `logits_to_keep` so the LM head runs only where the loss is (see samsum_qlora/training/objective.py).

`split_batch` cuts a collated batch of either layout, at example boundaries, into smaller batches of the same
layout (training.max_tokens_per_micro_batch; see samsum_qlora/training/microbatch.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from samsum_qlora.data.prompt import IGNORE_INDEX
from samsum_qlora.training.objective import loss_positions


def _check(features: list[dict]) -> None:
    for i, f in enumerate(features):
        if len(f["labels"]) != len(f["input_ids"]):
            raise ValueError(f"example {i}: {len(f['input_ids'])} input_ids but {len(f['labels'])} labels")


@dataclass
class PadCollator:
    """Right-pads input_ids with the pad id and labels with -100."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        _check(features)
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(features), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(features), longest), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[i, :n] = torch.as_tensor(f["input_ids"])
            labels[i, :n] = torch.as_tensor(f["labels"])
            attention_mask[i, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
                "logits_to_keep": loss_positions(labels)}


@dataclass
class FlatCollator:
    """Concatenates the examples into one row; position ids restart per example; no padding at all."""

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        _check(features)
        input_ids = torch.cat([torch.as_tensor(f["input_ids"]) for f in features])[None]
        labels = torch.cat([torch.as_tensor(f["labels"]) for f in features])[None]
        position_ids = torch.cat([torch.arange(len(f["input_ids"])) for f in features])[None]
        # An example's first token must never be a target: it would be predicted from the previous example.
        labels[position_ids == 0] = IGNORE_INDEX
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
                "logits_to_keep": loss_positions(labels), **example_boundaries([len(f["input_ids"]) for f in features])}


def example_boundaries(lengths: list[int], device: torch.device | str | None = None) -> dict:
    """Where the examples of a flat row start and end, and the longest, as variable-length attention reads them."""
    boundaries = torch.tensor([0, *lengths], device=device).cumsum(0).to(torch.int32)
    longest = max(lengths)
    return {"cu_seq_lens_q": boundaries, "cu_seq_lens_k": boundaries.clone(), "max_length_q": longest,
            "max_length_k": longest}


def example_lengths(batch: dict) -> list[int]:
    """Tokens of each example in a collated batch: a flat row's spans, or a padded batch's unpadded rows."""
    if "cu_seq_lens_q" in batch:
        return batch["cu_seq_lens_q"].diff().tolist()
    return batch["attention_mask"].sum(dim=1).tolist()


def group_examples(lengths: list[int], max_tokens: int, padded: bool) -> list[range]:
    """Consecutive examples in groups of at most `max_tokens` tokens (padded: rows x the group's longest row);
    an example longer than `max_tokens` makes a group of its own."""
    groups, start, longest = [], 0, 0
    for i, n in enumerate(lengths):
        longest = max(longest, n)
        tokens = (i + 1 - start) * longest if padded else sum(lengths[start:i + 1])
        if tokens > max_tokens and i > start:
            groups.append(range(start, i))
            start, longest = i, n
    groups.append(range(start, len(lengths)))
    return groups


def split_batch(batch: dict, max_tokens: int) -> list[dict]:
    """The batch as consecutive smaller batches of the same layout, each of at most `max_tokens` tokens (a flat
    row's length, or rows x padded length) unless it is one longer example; `[batch]` if it fits already."""
    lengths = example_lengths(batch)
    flat = "cu_seq_lens_q" in batch
    groups = group_examples(lengths, max_tokens, padded=not flat)
    if len(groups) == 1:
        return [batch]
    pieces = []
    if flat:
        starts = batch["cu_seq_lens_q"].tolist()
        for group in groups:
            span = slice(starts[group.start], starts[group.stop])
            piece = {key: batch[key][:, span] for key in ("input_ids", "labels", "position_ids")}
            pieces.append({**piece, **example_boundaries(lengths[group.start:group.stop], batch["input_ids"].device)})
    else:
        for group in groups:
            rows, width = slice(group.start, group.stop), max(lengths[group.start:group.stop])
            pieces.append({key: batch[key][rows, :width] for key in ("input_ids", "labels", "attention_mask")})
    for piece in pieces:
        piece["logits_to_keep"] = loss_positions(piece["labels"])
    return pieces
