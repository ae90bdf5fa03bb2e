"""What the train and evaluate stages choose for the Llama 3 shapes on common cards: the README's table.

    python -m benchmarks.card_plans

No GPU needed: these are the memory plans of samsum_qlora/memory/ (whose estimates are fitted to, and tested against,
peaks measured on an H200) for SAMSum's lengths through the Llama 3 template, the default params otherwise, and
a budget of the memory torch reports for each card. The largest step an epoch can hold (16 examples of 512
tokens) must fit, and so must generation for test prompts of up to 512 tokens.
"""

from __future__ import annotations

from benchmarks.harness.shapes import SHAPES
from samsum_qlora.memory.estimates import Shape
from samsum_qlora.memory.planning import plan_generation, plan_training
from samsum_qlora.params import EvalParams, TrainingParams

# The memory torch reports for cards sold as 24, 48 and 80 GB (e.g. RTX 4090, RTX A6000, A100/H100 80GB), in GiB.
CARDS = {"24 GB card": 23.6, "48 GB card": 47.5, "80 GB card": 79.2}
SEQUENCES, LONGEST, MEAN_LENGTH = 16, 512, 296  # SAMSum train examples (prompt.max_length 512): longest, mean
LOSS_FRACTION = 0.155  # summary tokens of an example
LONGEST_PROMPT = 512  # test prompts as long as the longest training example (benchmarks/harness/lengths.py clips there)
LLAMA_BASES = ("1B", "3B", "8B")  # the table's rows: the Llama 3 bases (a 135M model fits any card as set)


def shape(name: str) -> Shape:
    """What the estimates read of a Llama 3 shape (a key of SHAPES), through a transformers config as a stage would."""
    from transformers import LlamaConfig

    s = SHAPES[name]
    return Shape.from_config(LlamaConfig(
        vocab_size=s.vocab_size, hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_hidden_layers, num_attention_heads=s.num_attention_heads,
        num_key_value_heads=s.num_key_value_heads, head_dim=s.head_dim, tie_word_embeddings=s.tie_word_embeddings))


def cell(name: str, gib: float) -> str:
    """One table cell: what the plans change for base `name` within `gib`, in words."""
    s = shape(name)
    train = plan_training(s, TrainingParams(), gib, use_4bit=True, element=2, lora_r=8,
                          lora_targets=["q_proj", "v_proj"], mean_step_tokens=SEQUENCES * MEAN_LENGTH,
                          largest_step_tokens=SEQUENCES * LONGEST, longest_example=LONGEST,
                          loss_fraction=LOSS_FRACTION)
    generation = plan_generation(s, EvalParams(), gib, use_4bit=True, element=2, longest_prompt=LONGEST_PROMPT)
    words = []
    if not train.dequantize:
        words.append("4-bit base")
    if train.pass_limits is not None:
        most = max(c for _, c in train.checkpointing_steps())
        words.append(f"checkpointing per pass (up to {most} of {s.layers} layers)")
    elif train.gradient_checkpointing:
        words.append("checkpointing")
    if train.max_tokens_per_micro_batch != TrainingParams().max_tokens_per_micro_batch:
        words.append(f"cap {train.max_tokens_per_micro_batch:,}")
    if not generation.dequantize:
        words.append("4-bit base to generate")
    if generation.batch_size != EvalParams().batch_size:
        words.append(f"eval batches of {generation.batch_size}")
    if not words:
        return f"as set (estimate {max(train.estimate_gib, generation.estimate_gib):.1f} GiB)"
    return "; ".join(words)


def table() -> str:
    rows = ["| base | " + " | ".join(CARDS) + " |", "|---|" + "---|" * len(CARDS)]
    rows += [f"| {name} | " + " | ".join(cell(name, gib) for gib in CARDS.values()) + " |"
             for name in LLAMA_BASES]
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
