import torch

from samsum_qlora.data.prompt import IGNORE_INDEX
from samsum_qlora.training.batching import PadCollator


def test_pads_inputs_with_pad_id_and_labels_with_ignore_index():
    features = [
        {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8], "length": 4},
        {"input_ids": [9, 10], "labels": [-100, 10], "length": 2},
    ]
    batch = PadCollator(pad_token_id=0)(features)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8], [-100, 10, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert set(batch) == {"input_ids", "labels", "attention_mask", "logits_to_keep"}
    assert batch["logits_to_keep"].tolist() == [0, 1, 2]  # positions whose next token carries loss in a row


def test_labels_are_kept_not_rebuilt_from_inputs():
    # A prompt token equal to the pad id must stay masked, and a masked position must not be filled back in.
    features = [{"input_ids": [3, 0, 4], "labels": [IGNORE_INDEX, IGNORE_INDEX, 4]}]
    batch = PadCollator(pad_token_id=0, pad_to_multiple_of=8)(features)
    assert batch["input_ids"].shape == (1, 8)
    assert batch["labels"][0, :3].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 4]
    assert (batch["labels"][0, 3:] == IGNORE_INDEX).all()
    assert batch["input_ids"].dtype == torch.long


def test_mismatched_lengths_are_an_error():
    import pytest

    with pytest.raises(ValueError, match="3 input_ids but 2 labels"):
        PadCollator(pad_token_id=0)([{"input_ids": [1, 2, 3], "labels": [1, 2]}])
