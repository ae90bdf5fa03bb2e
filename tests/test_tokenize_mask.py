import copy
import logging
import os

import pytest

from samsum_qlora.data.prompt import (
    IGNORE_INDEX,
    build_example,
    build_examples,
    end_of_turn_ids,
    generation_prompt_ids,
    generation_prompts,
    has_generation_markers,
    user_content,
)
from samsum_qlora.errors import PipelineError
from samsum_qlora.params import PromptParams
from stages.tokenize_mask import tokenize_split

INSTRUCTION = "Summarize this dialogue."
DIALOGUE = "Anna: Are we still on for lunch?\nTom: Yes, 1 pm at the Italian place.\nAnna: Great, see you!"
SUMMARY = "Anna and Tom will have lunch at the Italian place at 1 pm."
DATE = "26 Jul 2024"

# Shaped like Llama 3.2's own template: a system header that prints a date, no {% generation %} markers.
LLAMA32_LIKE = (
    "{{ bos_token }}<|start_header_id|>system<|end_header_id|>\n\n"
    "Cutting Knowledge Date: December 2023\nToday Date: {{ date_string | default('01 Jan 2000') }}\n\n<|eot_id|>"
    "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# ChatML-style: the turn ends with a marker and then a newline, which must not carry loss.
CHATML_LIKE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# The generation prompt differs from how the full conversation renders the assistant header.
NOT_A_PREFIX = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<|start_header_id|>assistant: "
    "{{ m['content'] }}<|eot_id|>{% else %}<|start_header_id|>user<|end_header_id|>\n\n{{ m['content'] }}"
    "<|eot_id|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def _dies(pairs):  # a worker killed mid-chunk (e.g. by the kernel for memory)
    os._exit(9)


def with_template(tokenizer, template):
    other = copy.deepcopy(tokenizer)
    other.chat_template = template
    return other


def loss_text(tokenizer, example):
    return tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX])


def test_tiny_template_has_generation_markers(tiny_tokenizer):
    assert has_generation_markers(tiny_tokenizer)
    assert not has_generation_markers(with_template(tiny_tokenizer, LLAMA32_LIKE))


@pytest.mark.parametrize("template", [None, LLAMA32_LIKE], ids=["generation-markers", "llama32-no-markers"])
def test_only_summary_and_end_of_turn_carry_loss(tiny_tokenizer, template):
    tok = tiny_tokenizer if template is None else with_template(tiny_tokenizer, template)
    example = build_example(tok, INSTRUCTION, DIALOGUE, SUMMARY, 512, DATE)
    assert len(example.input_ids) == len(example.labels)
    assert loss_text(tok, example) == SUMMARY + "<|eot_id|>"
    # Token by token: every label is either ignored or equal to its input id, and the loss tokens are one
    # contiguous run at the very end.
    carried = [i for i, t in enumerate(example.labels) if t != IGNORE_INDEX]
    assert all(example.labels[i] == example.input_ids[i] for i in carried)
    assert carried == list(range(carried[0], len(example.input_ids)))
    prompt = generation_prompt_ids(tok, INSTRUCTION, DIALOGUE, DATE)
    assert example.input_ids[: len(prompt)] == prompt and carried[0] == len(prompt)
    assert tok.decode(example.input_ids).count(tok.bos_token) == 1
    assert not example.truncated


def test_fixed_date_reaches_templates_that_print_one(tiny_tokenizer):
    tok = with_template(tiny_tokenizer, LLAMA32_LIKE)
    a = build_example(tok, INSTRUCTION, DIALOGUE, SUMMARY, 512, "26 Jul 2024")
    b = build_example(tok, INSTRUCTION, DIALOGUE, SUMMARY, 512, "01 Aug 2031")
    assert "Today Date: 26 Jul 2024" in tok.decode(a.input_ids)
    assert a.input_ids != b.input_ids
    assert loss_text(tok, a) == loss_text(tok, b)


def test_trailing_newline_after_end_of_turn_carries_no_loss(tiny_tokenizer):
    tok = with_template(tiny_tokenizer, CHATML_LIKE)
    example = build_example(tok, INSTRUCTION, DIALOGUE, SUMMARY, 512, DATE)
    assert loss_text(tok, example) == SUMMARY + "<|im_end|>"
    assert tok.decode(example.input_ids).endswith("<|im_end|>\n")


def test_template_whose_prompt_is_not_a_prefix_fails_loudly(tiny_tokenizer):
    tok = with_template(tiny_tokenizer, NOT_A_PREFIX)
    with pytest.raises(PipelineError, match="not a prefix of the full conversation"):
        build_example(tok, INSTRUCTION, DIALOGUE, SUMMARY, 512, DATE)


def test_long_dialogue_is_shortened_and_the_summary_kept(tiny_tokenizer):
    lines = [f"Tom: line {i} about the trip to the lake and who brings the tent" for i in range(60)]
    dialogue = "\n".join(lines)
    full = build_example(tiny_tokenizer, INSTRUCTION, dialogue, SUMMARY, 10_000, DATE)
    example = build_example(tiny_tokenizer, INSTRUCTION, dialogue, SUMMARY, 128, DATE)
    assert len(full.input_ids) > 128 and not full.truncated
    assert example.truncated and 120 <= len(example.input_ids) <= 128
    assert loss_text(tiny_tokenizer, example) == SUMMARY + "<|eot_id|>"
    text = tiny_tokenizer.decode(example.input_ids)
    assert "line 0 about" in text and "line 59" not in text


def test_example_whose_summary_cannot_fit_is_dropped(tiny_tokenizer):
    long_summary = " ".join(["Anna and Tom will meet at the Italian place."] * 20)
    assert build_example(tiny_tokenizer, INSTRUCTION, DIALOGUE, long_summary, 64, DATE) is None


LONG_DIALOGUE = "\n".join(f"Tom: line {i} about the trip to the lake and who brings the tent" for i in range(60))


@pytest.mark.parametrize("template", [None, LLAMA32_LIKE, CHATML_LIKE], ids=["generation-markers", "llama32", "chatml"])
def test_a_test_dialogue_is_shortened_as_a_training_example_is(tiny_tokenizer, template):
    # With the summary's tokens taken out of the budget, the generation prompt is the training example's user part:
    # one rule cuts both.
    tok = tiny_tokenizer if template is None else with_template(tiny_tokenizer, template)
    example = build_example(tok, INSTRUCTION, LONG_DIALOGUE, SUMMARY, 128, DATE)
    assert example.truncated
    user_part = next(i for i, t in enumerate(example.labels) if t != IGNORE_INDEX)
    budget = 128 - (len(example.input_ids) - user_part)
    prompts, shortened = generation_prompts(tok, INSTRUCTION, [LONG_DIALOGUE], budget, DATE)
    assert shortened == [True] and prompts[0] == example.input_ids[:user_part]


def test_a_long_test_dialogues_prompt_fits_and_holds_the_dialogues_opening(tiny_tokenizer):
    dialogues = [DIALOGUE, LONG_DIALOGUE, "Ann: ok"]
    whole = [generation_prompt_ids(tiny_tokenizer, INSTRUCTION, d, DATE) for d in dialogues]
    prompts, shortened = generation_prompts(tiny_tokenizer, INSTRUCTION, dialogues, 128, DATE)
    assert len(whole[1]) > 500 and shortened == [False, True, False]
    assert prompts[0] == whole[0] and prompts[2] == whole[2]
    assert 120 <= len(prompts[1]) <= 128
    # The template around the dialogue is whole; the dialogue is its own first tokens.
    before, after = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": user_content(INSTRUCTION, "§")}], tokenize=False, add_generation_prompt=True,
        date_string=DATE).split("§")
    text = tiny_tokenizer.decode(prompts[1])
    assert text.startswith(before) and text.endswith(after)
    kept = text[len(before):-len(after)]
    assert kept.startswith("Tom: line 0 about") and "line 59" not in kept and LONG_DIALOGUE.startswith(kept)
    kept_ids = tiny_tokenizer(kept, add_special_tokens=False)["input_ids"]
    assert kept_ids == tiny_tokenizer(LONG_DIALOGUE, add_special_tokens=False)["input_ids"][:len(kept_ids)]
    assert prompts[1] == generation_prompt_ids(tiny_tokenizer, INSTRUCTION, kept, DATE)
    assert generation_prompts(tiny_tokenizer, INSTRUCTION, [], 128, DATE) == ([], [])


def test_a_budget_the_instruction_alone_fills_is_an_error_naming_the_param(tiny_tokenizer):
    with pytest.raises(PipelineError, match="prompt.max_length is 24 tokens, but prompt.instruction and the chat "
                                            "template alone leave no room for a dialogue"):
        generation_prompts(tiny_tokenizer, " ".join([INSTRUCTION] * 4), [DIALOGUE], 24, DATE)


@pytest.mark.parametrize("template", [None, LLAMA32_LIKE], ids=["generation-markers", "llama32-no-markers"])
def test_a_text_over_the_tokenizers_own_limit_prints_no_warning(tiny_tokenizer, template, caplog, monkeypatch):
    # transformers warns once per tokenizer about a text longer than its model_max_length ("Token indices sequence
    # length is longer than..."); here every such text is shortened before it reaches a model.
    monkeypatch.setattr(logging.getLogger("transformers"), "propagate", True)  # its own handler bypasses caplog
    tok = with_template(tiny_tokenizer, template) if template else copy.deepcopy(tiny_tokenizer)
    tok.model_max_length = 64
    tok.deprecation_warnings = {}
    tok(LONG_DIALOGUE)  # what the warning looks like, printed by a plain call
    assert "Token indices sequence length is longer" in caplog.text
    caplog.clear()
    tok.deprecation_warnings = {}
    example = build_example(tok, INSTRUCTION, LONG_DIALOGUE, SUMMARY, 128, DATE)
    prompts, _ = generation_prompts(tok, INSTRUCTION, [LONG_DIALOGUE], 128, DATE)
    assert example.truncated and len(prompts[0]) <= 128
    assert "Token indices" not in caplog.text


@pytest.mark.parametrize("template", [None, LLAMA32_LIKE, CHATML_LIKE], ids=["generation-markers", "llama32", "chatml"])
def test_a_batch_tokenizes_each_example_as_alone(tiny_tokenizer, template):
    # tokenize_mask encodes many conversations in one call: each must come out as if encoded by itself, in
    # order, with the too-long one shortened and the one whose summary cannot fit dropped.
    tok = tiny_tokenizer if template is None else with_template(tiny_tokenizer, template)
    long_dialogue = "\n".join(f"Tom: line {i} about the trip to the lake" for i in range(40))
    pairs = [(DIALOGUE, SUMMARY), ("Zoë: Can you feed the cat? 🐱\nJosé: Sure.", "José will feed Zoë's cat."),
             (long_dialogue, SUMMARY), (DIALOGUE, " ".join([SUMMARY] * 30)), ("Ann: ok", "Ann agrees.")]
    batch = build_examples(tok, INSTRUCTION, pairs, 160, DATE)
    assert batch == [build_example(tok, INSTRUCTION, d, s, 160, DATE) for d, s in pairs]
    assert [e is None for e in batch] == [False, False, False, True, False]
    assert batch[2].truncated and len(batch[2].input_ids) <= 160
    end = "<|im_end|>" if template is CHATML_LIKE else "<|eot_id|>"
    assert [loss_text(tok, e) for e in batch if e] == [
        SUMMARY + end, "José will feed Zoë's cat." + end, SUMMARY + end, "Ann agrees." + end]
    assert build_examples(tok, INSTRUCTION, [], 160, DATE) == []


def test_end_of_turn_is_the_templates_closing_token(tiny_tokenizer):
    assert tiny_tokenizer.convert_ids_to_tokens(end_of_turn_ids(tiny_tokenizer, DATE)) == ["<|eot_id|>"]


def test_split_statistics_match_the_examples(tiny_tokenizer):
    rows = [
        {"id": "a", "dialogue": DIALOGUE, "summary": SUMMARY},
        {"id": "b", "dialogue": "Zoë: Can you feed the cat? 🐱\nJosé: Sure.", "summary": "José will feed Zoë's cat."},
        {"id": "c", "dialogue": DIALOGUE, "summary": " ".join([SUMMARY] * 30)},
    ]
    prompt = PromptParams(instruction=INSTRUCTION, max_length=120, date_string=DATE)
    columns, stats = tokenize_split(tiny_tokenizer, rows, prompt)
    assert stats["examples"] == 2 and stats["dropped_summary_too_long"] == 1
    assert columns["length"] == [len(ids) for ids in columns["input_ids"]]
    loss = sum(t != IGNORE_INDEX for labels in columns["labels"] for t in labels)
    assert stats["loss_token_fraction"] == round(loss / sum(columns["length"]), 4)
    assert stats["length_max"] == max(columns["length"]) and stats["tokens"] == sum(columns["length"])
    assert tiny_tokenizer.decode([t for t in columns["labels"][1] if t != IGNORE_INDEX]) == (
        "José will feed Zoë's cat.<|eot_id|>"
    )


@pytest.mark.parametrize("template", [None, LLAMA32_LIKE], ids=["generation-markers", "llama32-no-markers"])
def test_forked_workers_build_the_same_examples_as_one_process(tiny_tokenizer, template, monkeypatch):
    import stages.tokenize_mask as tokenize_mask

    tok = with_template(tiny_tokenizer, template) if template else tiny_tokenizer
    long = " ".join([DIALOGUE] * 12)  # shortened to fit
    rows = [{"id": str(i), "dialogue": [DIALOGUE, long, f"Bo: item {i}?\nAl: yes."][i % 3],
             "summary": SUMMARY if i % 5 else " ".join([SUMMARY] * 30)} for i in range(23)]
    prompt = PromptParams(instruction=INSTRUCTION, max_length=120, date_string=DATE)
    monkeypatch.setattr(tokenize_mask, "CHUNK", 4)  # 6 chunks, spread over the workers
    one = tokenize_split(tok, rows, prompt, workers=1)
    forked = tokenize_split(tok, rows, prompt, workers=3)
    assert forked == one
    assert one[1]["dropped_summary_too_long"] == 5 and one[1]["truncated"] > 0
    assert tokenize_mask._worker_state is None


def test_a_workers_error_reaches_the_stage_as_its_one_line(tiny_tokenizer, monkeypatch):
    import stages.tokenize_mask as tokenize_mask

    tok = with_template(tiny_tokenizer, NOT_A_PREFIX)
    rows = [{"id": str(i), "dialogue": DIALOGUE, "summary": SUMMARY} for i in range(6)]
    monkeypatch.setattr(tokenize_mask, "CHUNK", 2)
    with pytest.raises(PipelineError, match="generation prompt is not a prefix"):
        tokenize_split(tok, rows, PromptParams(instruction=INSTRUCTION, max_length=120, date_string=DATE), workers=2)


def test_workers_follow_the_cores_and_the_chunks(monkeypatch):
    import stages.tokenize_mask as tokenize_mask

    monkeypatch.setattr(tokenize_mask.os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setattr(tokenize_mask.sys, "platform", "linux")
    assert [tokenize_mask.workers_for(n) for n in (1, 2, 15, 40)] == [1, 2, 15, tokenize_mask.MAX_WORKERS]
    monkeypatch.setattr(tokenize_mask.os, "sched_getaffinity", lambda pid: {0, 1})
    assert tokenize_mask.workers_for(15) == 2
    monkeypatch.setattr(tokenize_mask.sys, "platform", "darwin")
    assert tokenize_mask.workers_for(15) == 1


def test_a_worker_that_dies_is_a_clear_error_not_a_hang(tiny_tokenizer, monkeypatch):
    import stages.tokenize_mask as tokenize_mask

    monkeypatch.setattr(tokenize_mask, "CHUNK", 2)
    monkeypatch.setattr(tokenize_mask, "_build_chunk", _dies)
    rows = [{"id": str(i), "dialogue": DIALOGUE, "summary": SUMMARY} for i in range(6)]
    with pytest.raises(PipelineError, match="a worker process building the examples died"):
        tokenize_split(tiny_tokenizer, rows, PromptParams(instruction=INSTRUCTION, max_length=120, date_string=DATE),
                       workers=2)
