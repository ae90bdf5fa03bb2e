"""The training objective: mean cross-entropy over the summary tokens, with logits computed only there.

A causal LM's head turns every position into a vocabulary-sized row of logits (128k columns for Llama 3),
which dominates memory as batches grow. Only positions whose next token is a summary token carry loss
(~15% of a SAMSum example), so the batch names those positions (`logits_to_keep`, which transformers'
causal LMs accept as an index tensor) and the head runs on them alone. The value is the same mean as the
model's own loss over the same labels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from samsum_qlora.data.prompt import IGNORE_INDEX


def loss_positions(labels: torch.Tensor) -> torch.Tensor:
    """Sequence positions whose next token carries loss in any row of the batch (shifted, as a causal LM is)."""
    return (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)


def loss_token_count(labels: torch.Tensor) -> torch.Tensor:
    """How many tokens carry loss (the targets of positions 0..n-2 of each row), as the Trainer counts them."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def summary_loss(outputs, labels: torch.Tensor, num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of the kept logits against the next tokens, summed then divided by the loss tokens.

    `num_items_in_batch` is the Trainer's count of loss tokens over the whole optimizer step (all micro-batches
    and devices), which makes the step's loss the mean over its summary tokens however it is micro-batched.
    """
    keep = loss_positions(labels)
    targets = labels[:, keep + 1]
    logits = outputs["logits"]
    if logits.shape[1] != targets.shape[1]:
        raise ValueError(f"the model returned logits for {logits.shape[1]} positions, expected {targets.shape[1]}: "
                         "the batch must carry logits_to_keep = loss_positions(labels)")
    total = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                            reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else loss_token_count(labels)
    if isinstance(count, torch.Tensor):
        count = count.to(total.device)
    return total / count
