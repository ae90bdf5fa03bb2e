"""The fast training path (padding-free rows, packed attention, logits only where the loss is) computes the
same thing as the plain padded path: the same per-example losses and the same gradients.

On CPU, packed attention runs one SDPA call per example; benchmarks/check_packed.py checks the CUDA kernel.
"""

from contextlib import contextmanager, nullcontext

import pytest
import torch

from benchmarks.check_packed import example_means
from conftest import TINY_MODEL
from samsum_qlora.data.prompt import IGNORE_INDEX, build_example
from samsum_qlora.model import attention
from samsum_qlora.training.batching import FlatCollator, PadCollator
from samsum_qlora.training.objective import loss_positions, summary_loss

DATE = "26 Jul 2024"
PAIRS = [
    ("Anna: Lunch at 1?\nTom: Sure, the Italian place.", "Anna and Tom will have lunch at the Italian place at 1."),
    ("Zoë: Can you feed the cat this weekend? I'm away until Sunday.\nJosé: Of course, leave the key under the mat.",
     "José will feed Zoë's cat this weekend."),
    ("Mia: Running late, sorry!", "Mia is late."),
]


@pytest.fixture(scope="module")
def lora_model():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32, attn_implementation="sdpa")
    base.config.use_cache = False
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                            lora_dropout=0.0, init_lora_weights=False))
    return model.eval()


@pytest.fixture(scope="module")
def features(tiny_tokenizer):
    examples = [build_example(tiny_tokenizer, "Summarize this dialogue.", d, s, 512, DATE) for d, s in PAIRS]
    return [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]


@contextmanager
def packed_attention(model):
    base = model.get_base_model()
    base.set_attn_implementation(attention.register())
    try:
        yield
    finally:
        base.set_attn_implementation("sdpa")


def reference_losses(model, features) -> list[float]:
    """The model's own loss, one example at a time: no padding, no neighbours."""
    out = []
    with torch.no_grad():
        for f in features:
            out.append(model(input_ids=torch.tensor([f["input_ids"]]), labels=torch.tensor([f["labels"]])).loss.item())
    return out


def per_example_losses(model, batch: dict) -> list[float]:
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = model(**batch).logits
    return example_means(logits, labels, batch)


def test_only_positions_before_summary_tokens_get_logits(features):
    batch = PadCollator(pad_token_id=0)(features)
    keep = batch["logits_to_keep"]
    assert torch.equal((batch["labels"][:, keep + 1] != IGNORE_INDEX).any(0), torch.ones(len(keep), dtype=torch.bool))
    assert len(keep) < batch["labels"].shape[1] / 2  # most positions are prompt: no logits for them


def test_flat_rows_restart_positions_and_never_target_an_examples_first_token(features):
    batch = FlatCollator()(features)
    starts = (batch["position_ids"][0] == 0).nonzero().squeeze(-1).tolist()
    assert starts == [0, len(features[0]["input_ids"]), len(features[0]["input_ids"]) + len(features[1]["input_ids"])]
    assert all(batch["labels"][0, s] == IGNORE_INDEX for s in starts)
    assert batch["input_ids"].shape == (1, sum(len(f["input_ids"]) for f in features))
    assert "attention_mask" not in batch


LAYOUTS = {  # collator, whether the model runs packed attention
    "padded": (PadCollator(pad_token_id=0), False),
    "padding-free, SDPA block mask": (FlatCollator(), False),
    "padding-free, packed attention": (FlatCollator(), True),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_per_example_losses_match_one_at_a_time(lora_model, features, layout):
    expected = reference_losses(lora_model, features)
    collator, packed = LAYOUTS[layout]
    with packed_attention(lora_model) if packed else nullcontext():
        got = per_example_losses(lora_model, collator(features))
    assert got == pytest.approx(expected, rel=1e-4)


def test_batch_loss_is_the_mean_over_summary_tokens_in_both_layouts(lora_model, features):
    counts = [sum(t != IGNORE_INDEX for t in f["labels"][1:]) for f in features]
    expected = reference_losses(lora_model, features)
    token_mean = sum(loss * n for loss, n in zip(expected, counts, strict=True)) / sum(counts)
    for collator in (PadCollator(pad_token_id=0), FlatCollator()):
        batch = collator(features)
        labels = batch.pop("labels")
        with torch.no_grad():
            loss = summary_loss(lora_model(**batch), labels)
        assert loss.item() == pytest.approx(token_mean, rel=1e-4)
        # Normalised by a step-wide token count, as the Trainer does under gradient accumulation.
        with torch.no_grad():
            half = summary_loss(lora_model(**batch), labels, num_items_in_batch=2 * sum(counts))
        assert half.item() == pytest.approx(token_mean / 2, rel=1e-4)


def test_gradients_match_between_padded_and_padding_free(lora_model, features):
    grads = {}
    for layout, (collator, packed) in LAYOUTS.items():
        lora_model.zero_grad()
        batch = collator(features)
        labels = batch.pop("labels")
        with packed_attention(lora_model) if packed else nullcontext():
            summary_loss(lora_model(**batch), labels).backward()
        grads[layout] = {n: p.grad.clone() for n, p in lora_model.named_parameters() if p.requires_grad}
    reference = grads.pop("padded")
    assert reference and any(g.abs().sum() > 0 for g in reference.values())
    for layout, got in grads.items():
        assert got.keys() == reference.keys()
        for name in reference:
            torch.testing.assert_close(got[name], reference[name], rtol=1e-3, atol=1e-6, msg=f"{layout}: {name}")


def test_flat_rows_say_where_each_example_starts(features):
    batch = FlatCollator()(features)
    lengths = [len(f["input_ids"]) for f in features]
    assert batch["cu_seq_lens_q"].tolist() == [0, lengths[0], lengths[0] + lengths[1], sum(lengths)]
    assert batch["cu_seq_lens_q"].dtype == torch.int32 and torch.equal(batch["cu_seq_lens_k"], batch["cu_seq_lens_q"])
    assert batch["max_length_q"] == batch["max_length_k"] == max(lengths)


def test_packed_attention_refuses_padded_batches(lora_model, features):
    batch = PadCollator(pad_token_id=0)(features)
    batch.pop("labels")
    with packed_attention(lora_model), pytest.raises(ValueError, match="needs one packed row and its cu_seq_lens_q"):
        lora_model(**batch)


def test_loss_positions_are_shifted_by_one():
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 5, 6], [IGNORE_INDEX, 7, IGNORE_INDEX, IGNORE_INDEX]])
    assert loss_positions(labels).tolist() == [0, 1, 2]
