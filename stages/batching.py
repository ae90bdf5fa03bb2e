"""Batching tokenized examples: pad at batch time, and never let padding carry loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stages.prompt import IGNORE_INDEX


@dataclass
class PadCollator:
    """Right-pads input_ids with the pad id and labels with -100; the labels are the stage's own, never rebuilt.

    (A collator that rebuilds labels from input_ids, like DataCollatorForLanguageModeling, would silently
    train on the prompt too.)
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(features), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(features), longest), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            if len(f["labels"]) != n:
                raise ValueError(f"example {i}: {n} input_ids but {len(f['labels'])} labels")
            input_ids[i, :n] = torch.as_tensor(f["input_ids"])
            labels[i, :n] = torch.as_tensor(f["labels"])
            attention_mask[i, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
