"""The prompt: how a dialogue and its summary become a chat conversation, and which tokens carry loss.

The user turn is the instruction followed by the dialogue; the assistant turn is the summary. Both training
(`build_example`) and evaluation (`generation_prompt_ids`) render through the model's own chat template, so
the model is asked at evaluation time exactly what it was taught.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from stages.errors import PipelineError

IGNORE_INDEX = -100  # label value that the loss skips


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


def user_content(instruction: str, dialogue: str) -> str:
    return f"{instruction}\n\n{dialogue}"


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], generation_prompt: bool, date_string: str) -> str:
    # date_string pins templates that would otherwise print today's date (Llama 3.x); others ignore it.
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt, date_string=date_string
    )


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    # The rendered template already holds the special tokens (e.g. BOS); adding them again would double them.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def has_generation_markers(tokenizer: PreTrainedTokenizerBase) -> bool:
    template = tokenizer.chat_template
    return isinstance(template, str) and "{% generation %}" in template.replace("{%-", "{%").replace("-%}", "%}")


def generation_prompt_ids(
    tokenizer: PreTrainedTokenizerBase, instruction: str, dialogue: str, date_string: str
) -> list[int]:
    """Token ids of the user turn followed by the template's assistant header, ready for generation."""
    return _encode(tokenizer, _render(tokenizer, [_user(instruction, dialogue)], True, date_string))


def _user(instruction: str, dialogue: str) -> dict:
    return {"role": "user", "content": user_content(instruction, dialogue)}


def _strip_trailing_whitespace_tokens(tokenizer: PreTrainedTokenizerBase, ids: list[int], mask: list[int]) -> None:
    """Unmask whitespace-only tokens after the end of turn (e.g. the newline after ChatML's <|im_end|>)."""
    for i in range(len(ids) - 1, -1, -1):
        if not mask[i]:
            continue
        if tokenizer.decode([ids[i]]).strip():
            return
        mask[i] = 0


def summary_token_mask(
    tokenizer: PreTrainedTokenizerBase, instruction: str, dialogue: str, summary: str, date_string: str
) -> tuple[list[int], list[int]]:
    """The full conversation's token ids, and a 0/1 mask that is 1 on the summary and its end-of-turn token(s)."""
    messages = [_user(instruction, dialogue), {"role": "assistant", "content": summary}]
    full_text = _render(tokenizer, messages, False, date_string)
    full_ids = _encode(tokenizer, full_text)
    if has_generation_markers(tokenizer):
        out = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, date_string=date_string
        )
        mask = list(out["assistant_masks"])
        if list(out["input_ids"]) != full_ids:
            raise PipelineError(
                "the chat template tokenizes differently with and without the assistant mask; "
                "the tokenizer's template cannot be masked reliably"
            )
    else:
        prompt_text = _render(tokenizer, messages[:1], True, date_string)
        prompt_ids = _encode(tokenizer, prompt_text)
        if not full_text.startswith(prompt_text) or full_ids[: len(prompt_ids)] != prompt_ids:
            raise PipelineError(
                "the chat template's generation prompt is not a prefix of the full conversation, so the "
                "summary tokens cannot be located; use a tokenizer whose template supports {% generation %} "
                "or one whose prompt is a prefix (model.tokenizer_type)"
            )
        mask = [0] * len(prompt_ids) + [1] * (len(full_ids) - len(prompt_ids))
    _strip_trailing_whitespace_tokens(tokenizer, full_ids, mask)
    if not any(mask):
        raise PipelineError("the chat template produced no assistant tokens for a summary; check model.tokenizer_type")
    return full_ids, mask


def build_example(
    tokenizer: PreTrainedTokenizerBase,
    instruction: str,
    dialogue: str,
    summary: str,
    max_length: int,
    date_string: str,
) -> Example | None:
    """Tokenize one training example, shortening the dialogue (never the summary) to fit `max_length`.

    Returns None when even an empty dialogue leaves no room for the summary.
    """
    ids, mask = summary_token_mask(tokenizer, instruction, dialogue, summary, date_string)
    truncated = False
    if len(ids) > max_length:
        truncated = True
        dialogue_ids = _encode(tokenizer, dialogue)
        keep = len(dialogue_ids) - (len(ids) - max_length)
        while True:
            if keep <= 0:
                return None
            # Cut at the end: the opening of a chat sets the topic; decoding and re-encoding may shift a token.
            shortened = tokenizer.decode(dialogue_ids[:keep]).rstrip()
            ids, mask = summary_token_mask(tokenizer, instruction, shortened, summary, date_string)
            if len(ids) <= max_length:
                break
            keep -= max(1, len(ids) - max_length)
    labels = [tok if m else IGNORE_INDEX for tok, m in zip(ids, mask, strict=True)]
    return Example(input_ids=ids, labels=labels, truncated=truncated)


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase, date_string: str) -> list[int]:
    """Token ids that close an assistant turn in this template (e.g. <|eot_id|>), found by rendering one."""
    probe = "ok"
    ids, mask = summary_token_mask(tokenizer, "", "-", probe, date_string)
    labelled = [t for t, m in zip(ids, mask, strict=True) if m]
    content = _encode(tokenizer, probe)
    tail = labelled[len(content):] if labelled[: len(content)] == content else labelled[-1:]
    return tail or labelled[-1:]
