"""The offline profile's committed assets: the synthetic dataset and the tiny chat model with its tokenizer."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import ROOT, TINY_MODEL
from offline import build_dataset, build_tiny_model

SAMPLES = ROOT / "data" / "samples"
INSTRUCTION = "Summarize this dialogue in one or two sentences."
UNICODE_TEXTS = [
    "Zoë: ¿Nos vemos mañana en el Café Nova? ☕",
    "José: 東京で会いましょう 🙂👍🏽",
    "Søren: naïve coöperation — “quotes”, ellipsis…",
    "tabs\tand\r\nwindows line ends, trailing spaces   ",
    "e\u0301 (combining accent), \u200b zero width, 🦙🧑‍🤝‍🧑",
]


@pytest.fixture(scope="module")
def splits() -> dict[str, list[dict[str, str]]]:
    return {
        name: json.loads((SAMPLES / f"{name}.json").read_text(encoding="utf-8")) for name in build_dataset.SPLIT_SIZES
    }


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TINY_MODEL)


def chat(dialogue: str, summary: str | None = None) -> list[dict[str, str]]:
    messages = [{"role": "user", "content": f"{INSTRUCTION}\n\n{dialogue}"}]
    return messages + ([{"role": "assistant", "content": summary}] if summary is not None else [])


# --- the dataset ---------------------------------------------------------------------------------------


def test_generator_is_deterministic_and_seeded():
    first, again = build_dataset.build_splits(7), build_dataset.build_splits(7)
    assert first == again
    assert {k: build_dataset.dumps_split(v) for k, v in first.items()} == {
        k: build_dataset.dumps_split(v) for k, v in again.items()
    }
    assert build_dataset.build_splits(8)["train"] != first["train"]


def test_committed_samples_are_what_the_generator_writes():
    for name, rows in build_dataset.build_splits().items():
        committed = (SAMPLES / f"{name}.json").read_text(encoding="utf-8")
        assert committed == build_dataset.dumps_split(rows), f"rerun `python -m offline.build_dataset` ({name})"


def test_sizes_ids_and_fields(splits):
    assert {name: len(rows) for name, rows in splits.items()} == {"train": 320, "validation": 40, "test": 40}
    ids = [row["id"] for rows in splits.values() for row in rows]
    assert len(ids) == len(set(ids))
    for name, rows in splits.items():
        for row in rows:
            assert set(row) == {"id", "dialogue", "summary"}
            assert re.fullmatch(rf"s-{name}-\d{{4}}", row["id"])
            assert row["dialogue"].strip() and row["summary"].strip()
            assert row["summary"] == row["summary"].strip()


def test_dialogues_are_samsum_shaped(splits):
    rows = [row for rows in splits.values() for row in rows]
    for row in rows:
        lines = row["dialogue"].split("\n")
        assert 2 <= len(lines) <= 8
        assert all(re.fullmatch(r"[^\s:]+: \S.*", line) for line in lines), row["dialogue"]
    assert len({row["dialogue"] for row in rows}) == len(rows), "a dialogue appears twice"
    assert any(not row["dialogue"].isascii() for row in rows) and any(not row["summary"].isascii() for row in rows)


def test_summaries_name_someone_from_their_dialogue(splits):
    for row in (row for rows in splits.values() for row in rows):
        speakers = {line.split(": ", 1)[0] for line in row["dialogue"].split("\n")}
        assert any(re.search(rf"\b{re.escape(name)}\b", row["summary"]) for name in speakers), row


def test_train_split_covers_many_scenarios(splits):
    # With the names taken out, a summary's first two words tell its scenario and phrasing apart.
    def opening(summary: str) -> str:
        words = [w for w in re.findall(r"[\w']+", summary) if w.split("'")[0] not in build_dataset.NAMES]
        return " ".join(words[:2])

    assert len({opening(row["summary"]) for row in splits["train"]}) >= 20


# --- the tokenizer -------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_tokenizer_round_trips_unicode(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.unk_token_id is None or tokenizer.unk_token_id not in ids


def test_special_tokens_follow_llama3_with_a_real_pad(tokenizer):
    assert tokenizer.bos_token == "<|begin_of_text|>"
    assert tokenizer.eos_token == "<|eot_id|>"
    assert tokenizer.pad_token == "<|pad|>"
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3
    for marker in ("<|start_header_id|>", "<|end_header_id|>"):
        assert len(tokenizer(marker, add_special_tokens=False)["input_ids"]) == 1
    # Like Llama 3: plain text gets a BOS, and the rendered chat carries its own.
    assert tokenizer("hello")["input_ids"][0] == tokenizer.bos_token_id


def test_committed_tokenizer_matches_the_train_split(tokenizer, splits):
    texts = [row["dialogue"] for row in splits["train"]] + [row["summary"] for row in splits["train"]]
    retrained = build_tiny_model.train_tokenizer(texts)
    assert retrained.get_vocab() == tokenizer.get_vocab(), "rerun `python -m offline.build_tiny_model`"


def test_generation_prompt_is_an_exact_prefix_of_the_conversation(tokenizer, splits):
    for row in splits["test"][:10]:
        prompt = tokenizer.apply_chat_template(chat(row["dialogue"]), tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(chat(row["dialogue"], row["summary"]), tokenize=False)
        assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
        assert full == prompt + row["summary"] + "<|eot_id|>"
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        assert full_ids[: len(prompt_ids)] == prompt_ids
        assert full_ids.count(tokenizer.bos_token_id) == 1 and full_ids[0] == tokenizer.bos_token_id


def test_assistant_mask_covers_exactly_the_summary_and_its_end_of_turn(tokenizer, splits):
    for row in splits["test"][:10]:
        out = tokenizer.apply_chat_template(
            chat(row["dialogue"], row["summary"]), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
        rendered = tokenizer.apply_chat_template(chat(row["dialogue"], row["summary"]), tokenize=False)
        assert ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
        start = mask.index(1)
        assert mask == [0] * start + [1] * (len(ids) - start), "the mask is one run that ends the sequence"
        assert tokenizer.decode(ids[start:]) == row["summary"] + "<|eot_id|>"
        assert ids[-1] == tokenizer.eos_token_id


# --- the model -----------------------------------------------------------------------------------------


def test_model_loads_and_has_lora_targets(tokenizer):
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL)
    assert model.config.model_type == "llama"
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    assert {"q_proj", "v_proj"} <= names
    cfg = model.config
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    assert cfg.hidden_size % 64 == 0 and cfg.intermediate_size % 64 == 0
    assert cfg.max_position_embeddings >= 1024 and cfg.tie_word_embeddings
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    ids = tokenizer("Anna: hi", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert model(ids).logits.shape == (1, ids.shape[1], len(tokenizer))


def test_model_files_are_safetensors_and_small():
    files = [path for path in TINY_MODEL.iterdir() if path.is_file()]
    assert any(path.suffix == ".safetensors" for path in files)
    assert not any(path.suffix in {".bin", ".pt", ".pth", ".pkl"} for path in files)
    assert sum(path.stat().st_size for path in files) < 8 * 1024 * 1024


# --- how the model was pretrained ----------------------------------------------------------------------


def test_pretraining_never_puts_a_dialogue_with_its_summary(tokenizer, splits):
    rows = splits["train"][:12]
    corpus = build_tiny_model.pretraining_corpus(tokenizer, rows, random.Random(0))
    texts = [tokenizer.decode(ids) for ids in corpus]
    assert len(corpus) == 3 * len(rows)
    for row in rows:
        assert not any(row["dialogue"] in text and row["summary"] in text for text in texts)
        assert any(text == f"<|begin_of_text|>{row['summary']}<|eot_id|>" for text in texts)
    assert not any("Summar" in text for text in texts)


def test_quoting_tasks_are_answered_from_the_dialogue(splits):
    rng = random.Random(0)
    for row in splits["train"][:50]:
        instruction, answer = build_tiny_model.dialogue_task(row["dialogue"], rng)
        assert answer.rstrip(".") in row["dialogue"]
        assert "summar" not in instruction.lower()
