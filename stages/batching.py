"""Batching tokenized examples without letting padding, or a neighbouring example, carry loss or attention.

Two collators, both keeping the labels the stage computed (a collator that rebuilds labels from input_ids,
like DataCollatorForLanguageModeling, would silently train on the prompt too):
- `PadCollator` right-pads to the longest example, with an attention mask;
- `FlatCollator` (training.padding_free) lays the examples end to end in one row with position ids that
  restart at 0 for each, and their boundaries (`cu_seq_lens_*`, `max_length_*`: the keyword arguments
  transformers hands to variable-length attention, see stages/attention.py). No token attends across
  examples and no compute is spent on padding. Under plain SDPA, transformers builds a block-diagonal causal
  mask from the position ids instead.
Both add `logits_to_keep` so the LM head runs only where the loss is (see stages/objective.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stages.objective import loss_positions
from stages.prompt import IGNORE_INDEX


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
        lengths = torch.tensor([0] + [len(f["input_ids"]) for f in features])
        boundaries = lengths.cumsum(0).to(torch.int32)
        longest = int(lengths.max())
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
                "logits_to_keep": loss_positions(labels),
                "cu_seq_lens_q": boundaries, "cu_seq_lens_k": boundaries.clone(),
                "max_length_q": longest, "max_length_k": longest}
