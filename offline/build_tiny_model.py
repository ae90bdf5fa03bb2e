"""Build the tiny Llama-architecture chat model of the offline profile, with its tokenizer.

    python -m offline.build_tiny_model [--out offline/tiny-llama] [--steps 1200]

The tokenizer is a byte-level BPE trained on the bundled train split (any Unicode text encodes and
decodes back exactly) with Llama-3-style special tokens and a chat template that marks the assistant
turn with {% generation %}. The model is pretrained briefly from random weights on text of the same kind
as the bundled data, and never on a dialogue followed by its summary: dialogues and summaries appear
only as separate texts, and the chat template only with instructions that are answered by quoting the
dialogue. So the base knows the language, the summary style and the chat format, its zero-shot summaries
are poor, and a LoRA adapter has something to learn. Same inputs, seed and thread count: same bytes on
the same machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from offline.build_dataset import make_example

logger = logging.getLogger(__name__)

DEFAULT_OUT = Path("offline/tiny-llama")
SAMPLES = Path("data/samples")

BOS, EOT, PAD = "<|begin_of_text|>", "<|eot_id|>", "<|pad|>"
START_HEADER, END_HEADER = "<|start_header_id|>", "<|end_header_id|>"
VOCAB_SIZE = 2048  # the corpus yields ~1,800 tokens; reserved specials fill the rest, as in Llama 3
# Llama 3's pre-tokenizer split: runs of newlines stay one piece, so "\n\n" before the summary tokenizes
# the same whether or not the summary follows (the generation prompt is a token prefix of the full chat).
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Llama 3 shape. The assistant's <|eot_id|> sits inside {% generation %} so that the assistant mask
# (return_assistant_tokens_mask=True) covers the token that teaches the model to stop.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] | trim }}{{ '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}"
    "{{ message['content'] | trim }}{{ '<|eot_id|>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int = 128
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    num_key_value_heads: int = 2  # grouped-query attention, as in Llama 3.2
    intermediate_size: int = 384
    max_position_embeddings: int = 1024


@dataclass(frozen=True)
class PretrainConfig:
    steps: int = 1200
    batch_size: int = 16
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    extra_examples: int = 3000  # freshly generated dialogues and summaries, beyond the train split
    seed: int = 1234
    threads: int = 2  # fixed, because float reductions split across threads round differently


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Byte-level BPE on `texts`, padded with reserved special tokens to exactly `vocab_size`."""
    specials = [BOS, EOT, PAD, START_HEADER, END_HEADER]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(vocab_size - bpe.get_vocab_size())]
    bpe.add_special_tokens(reserved)
    # Like Llama 3, plain tokenizer(text) prepends BOS; the chat template writes its own BOS, so a
    # rendered chat is tokenized with add_special_tokens=False (apply_chat_template does exactly that).
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bpe.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS,
        eos_token=EOT,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        model_max_length=ModelShape.max_position_embeddings,
    )


def tiny_llama_config(tokenizer: PreTrainedTokenizerFast, shape: ModelShape) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def dialogue_task(dialogue: str, rng: random.Random) -> tuple[str, str]:
    """A random (instruction, answer) about `dialogue`, answered by quoting it, never by summarising."""
    turns = [line.split(": ", 1) for line in dialogue.split("\n")]
    speaker = rng.choice([name for name, _ in turns])
    tasks = [
        ("Quote the first message.", turns[0][1]),
        ("Quote the last message.", turns[-1][1]),
        ("Who sent the last message?", f"{turns[-1][0]}."),
        (f"What did {speaker} say first?", next(text for name, text in turns if name == speaker)),
    ]
    return rng.choice(tasks)


def extra_examples(count: int, rng: random.Random, held_out: set[str]) -> list[dict[str, str]]:
    """Freshly generated examples, none sharing a dialogue or summary with `held_out` (validation, test)."""
    rows: list[dict[str, str]] = []
    while len(rows) < count:
        dialogue, summary = make_example(rng)
        if dialogue not in held_out and summary not in held_out:
            rows.append({"dialogue": dialogue, "summary": summary})
    return rows


def pretraining_corpus(
    tokenizer: PreTrainedTokenizerFast, rows: list[dict[str, str]], rng: random.Random
) -> list[list[int]]:
    """Token ids of every dialogue and every summary on its own, plus one quoting task per dialogue.

    Each is a separate sequence (BOS ... EOT), so no dialogue is ever in context with its summary.
    """
    texts = [row["dialogue"] for row in rows] + [row["summary"] for row in rows]
    for row in rows:
        instruction, answer = dialogue_task(row["dialogue"], rng)
        messages = [
            {"role": "user", "content": f"{instruction}\n\n{row['dialogue']}"},
            {"role": "assistant", "content": answer},
        ]
        texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
    bos, eot = tokenizer.bos_token, tokenizer.eos_token
    plain = [f"{bos}{text}{eot}" for text in texts[: 2 * len(rows)]]
    return tokenizer(plain + texts[2 * len(rows) :], add_special_tokens=False)["input_ids"]


def collate(chunk: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence; padding is masked out of attention and loss."""
    width = max(map(len, chunk))
    input_ids = torch.full((len(chunk), width), pad_id)
    attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
    for row, ids in enumerate(chunk):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": input_ids.masked_fill(attention_mask == 0, -100),
    }


def length_grouped_batches(
    sequences: list[list[int]], batch_size: int, pad_id: int, generator: torch.Generator
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled batches of sequences of similar length, so that little compute goes to padding."""
    window = 32 * batch_size
    while True:
        order = torch.randperm(len(sequences), generator=generator).tolist()
        batches = []
        for start in range(0, len(order), window):
            by_length = sorted(order[start : start + window], key=lambda i: len(sequences[i]))
            batches += [by_length[i : i + batch_size] for i in range(0, len(by_length) - batch_size + 1, batch_size)]
        for index in torch.randperm(len(batches), generator=generator).tolist():
            yield collate([sequences[i] for i in batches[index]], pad_id)


def warmup_cosine(step: int, warmup: int, total: int, floor: float = 0.1) -> float:
    """Learning-rate factor: linear warmup, then cosine decay to `floor`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def pretrain(model: LlamaForCausalLM, sequences: list[list[int]], pad_id: int, cfg: PretrainConfig) -> list[float]:
    """Plain causal-LM training; returns the loss of every step."""
    generator = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.learning_rate, betas=(0.9, 0.95), weight_decay=cfg.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, cfg.warmup_steps, cfg.steps)
    )
    batches = length_grouped_batches(sequences, cfg.batch_size, pad_id, generator)
    losses: list[float] = []
    model.train()
    progress = tqdm(range(cfg.steps), desc="pretraining", unit="step")
    for _ in progress:
        loss = model(**next(batches)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        progress.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


def model_card(config: LlamaConfig, n_params: int, cfg: PretrainConfig, corpus_size: int, final_loss: float) -> str:
    return f"""# tiny-llama (offline profile)

A tiny Llama-architecture chat model with its own tokenizer, built by `python -m offline.build_tiny_model`
so that the pipeline, its tests and the demo run on a laptop or a CI runner without a GPU or a network.
**For tests and demos only**: it knows nothing beyond the kind of synthetic chat in `data/samples/`.

## Model
- `LlamaForCausalLM`: {config.num_hidden_layers} layers, hidden size {config.hidden_size}, \
{config.num_attention_heads} attention heads sharing {config.num_key_value_heads} key/value heads (grouped-query \
attention, as in Llama 3.2), MLP size {config.intermediate_size}, tied input/output embeddings, \
{config.max_position_embeddings} positions; {n_params:,} parameters, stored as float32 safetensors.
- Tokenizer: byte-level BPE of {config.vocab_size} entries trained on the bundled train split
  (`data/samples/train.json`); every byte is in the vocabulary, so any Unicode text round-trips exactly.
  Special tokens follow Llama 3: `{BOS}` (BOS), `{EOT}` (EOS, ends every turn), `{PAD}` (a dedicated pad
  token, not EOS), `{START_HEADER}` / `{END_HEADER}` around the role, and unused reserved tokens.
  Like Llama 3's, `tokenizer(text)` prepends BOS; the chat template writes BOS itself, so a rendered
  conversation is tokenized with `add_special_tokens=False` (as `apply_chat_template` does).
- Chat template: Llama 3's layout without the system header. The assistant's content and its `{EOT}` are
  wrapped in `{{% generation %}}`, so `apply_chat_template(..., return_dict=True,
  return_assistant_tokens_mask=True)` marks exactly the assistant's tokens and the token that ends its turn.

## Training
Pretrained from random weights as a causal language model on {corpus_size:,} separate sequences:
- every dialogue and every summary of the train split and of {cfg.extra_examples:,} more examples from
  `offline/build_dataset.py` (none shares a dialogue or a summary with the validation or test split),
  each on its own as `{BOS}text{EOT}`;
- one chat per dialogue, in the chat template, whose instruction is answered by quoting the dialogue
  ("Quote the last message.", "Who sent the last message?", ...).

A dialogue is never in context with its summary, and no chat asks for a summary: the model knows the
language, the summary style and the chat format, but summarising is what fine-tuning has to teach, so its
zero-shot baseline is poor. {cfg.steps} steps of batch {cfg.batch_size} (sequences of similar length \
together), AdamW (lr {cfg.learning_rate}, {cfg.warmup_steps} warmup steps, cosine decay, weight decay \
{cfg.weight_decay}), seed {cfg.seed}, {cfg.threads} CPU threads, deterministic algorithms; training loss \
over the last 50 steps {final_loss:.3f}.

## Licence
Built only from the project's own synthetic data; same licence as the project.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--steps", type=int, default=PretrainConfig.steps)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = PretrainConfig(steps=args.steps)
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.seed)

    splits = {
        name: json.loads((SAMPLES / f"{name}.json").read_text(encoding="utf-8"))
        for name in ("train", "validation", "test")
    }
    train = splits["train"]
    held_out = {row[key] for name in ("validation", "test") for row in splits[name] for key in ("dialogue", "summary")}
    tokenizer = train_tokenizer([row["dialogue"] for row in train] + [row["summary"] for row in train])
    config = tiny_llama_config(tokenizer, ModelShape())
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("tiny Llama: %s parameters, vocabulary %d", f"{n_params:,}", config.vocab_size)

    rng = random.Random(cfg.seed)
    rows = train + extra_examples(cfg.extra_examples, rng, held_out)
    corpus = pretraining_corpus(tokenizer, rows, rng)
    started = time.perf_counter()
    losses = pretrain(model, corpus, tokenizer.pad_token_id, cfg)
    final_loss = sum(losses[-50:]) / len(losses[-50:])
    logger.info("pretrained %d steps in %.0f s, final loss %.3f", cfg.steps, time.perf_counter() - started, final_loss)

    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    card = model_card(config, n_params, cfg, len(corpus), final_loss)
    (args.out / "README.md").write_text(card, encoding="utf-8")
    logger.info("saved to %s", args.out)


if __name__ == "__main__":
    main()
