"""The prompt: how a dialogue and its summary become a chat conversation, and which tokens carry loss.

The user turn is the instruction followed by the dialogue; the assistant turn is the summary. Both training
(`build_examples`) and evaluation (`generation_prompts`) render through the model's own chat template and shorten
a dialogue that does not fit prompt.max_length by one rule (`_fit_dialogue`), so the model is asked at evaluation
time exactly what it was taught.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from transformers import PreTrainedTokenizerBase

from samsum_qlora.errors import PipelineError

IGNORE_INDEX = -100  # label value that the loss skips
Rendered = TypeVar("Rendered")  # what a conversation renders to besides its ids (the loss mask, or nothing)


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
    # verbose=False: a text longer than the tokenizer's model_max_length is expected here (it is shortened next),
    # so its "Token indices sequence length is longer than..." warning would only mislead.
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def _encode_many(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    # One call: a fast tokenizer encodes the list on all cores.
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]]


def has_generation_markers(tokenizer: PreTrainedTokenizerBase) -> bool:
    template = tokenizer.chat_template
    return isinstance(template, str) and "{% generation %}" in template.replace("{%-", "{%").replace("-%}", "%}")


def generation_prompt_ids(
    tokenizer: PreTrainedTokenizerBase, instruction: str, dialogue: str, date_string: str
) -> list[int]:
    """Token ids of the user turn followed by the template's assistant header, the dialogue whole however long."""
    return _encode(tokenizer, _render(tokenizer, [_user(instruction, dialogue)], True, date_string))


def generation_prompts(
    tokenizer: PreTrainedTokenizerBase, instruction: str, dialogues: list[str], max_length: int, date_string: str
) -> tuple[list[list[int]], list[bool]]:
    """The generation prompts of `dialogues`, each at most `max_length` tokens (a longer dialogue is cut at its
    end, as in training), and which were shortened."""
    if not dialogues:
        return [], []
    texts = tokenizer.apply_chat_template([[_user(instruction, d)] for d in dialogues], tokenize=False,
                                          add_generation_prompt=True, date_string=date_string)
    prompts = _encode_many(tokenizer, texts)
    shortened = [len(ids) > max_length for ids in prompts]
    for i in (i for i, cut in enumerate(shortened) if cut):
        fitted = _fit_dialogue(tokenizer, dialogues[i], len(prompts[i]) - max_length, max_length,
                               lambda d: (generation_prompt_ids(tokenizer, instruction, d, date_string), None))
        if fitted is None:
            raise PipelineError(
                f"prompt.max_length is {max_length} tokens, but prompt.instruction and the chat template alone "
                "leave no room for a dialogue; raise prompt.max_length or shorten prompt.instruction"
            )
        prompts[i] = fitted[0]
    return prompts, shortened


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


def summary_token_masks(
    tokenizer: PreTrainedTokenizerBase, instruction: str, pairs: list[tuple[str, str]], date_string: str
) -> list[tuple[list[int], list[int]]]:
    """For each (dialogue, summary): the conversation's token ids, and a 0/1 mask that is 1 on the summary and its
    end-of-turn token(s). The templates are rendered one by one; the tokenizer encodes the whole list at once."""
    if not pairs:
        return []
    conversations = [[_user(instruction, dialogue), {"role": "assistant", "content": summary}]
                     for dialogue, summary in pairs]
    full_texts = tokenizer.apply_chat_template(
        conversations, tokenize=False, add_generation_prompt=False, date_string=date_string
    )
    full_ids = _encode_many(tokenizer, full_texts)
    if has_generation_markers(tokenizer):
        out = tokenizer.apply_chat_template(
            conversations, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, date_string=date_string,
            tokenizer_kwargs={"verbose": False},
        )
        masks = [list(mask) for mask in out["assistant_masks"]]
        if any(list(ids) != full for ids, full in zip(out["input_ids"], full_ids, strict=True)):
            raise PipelineError(
                "the chat template tokenizes differently with and without the assistant mask; "
                "the tokenizer's template cannot be masked reliably"
            )
    else:
        prompt_texts = tokenizer.apply_chat_template(
            [conversation[:1] for conversation in conversations], tokenize=False, add_generation_prompt=True,
            date_string=date_string,
        )
        masks = []
        for full_text, prompt_text, full, prompt in zip(
            full_texts, prompt_texts, full_ids, _encode_many(tokenizer, prompt_texts), strict=True
        ):
            if not full_text.startswith(prompt_text) or full[: len(prompt)] != prompt:
                raise PipelineError(
                    "the chat template's generation prompt is not a prefix of the full conversation, so the "
                    "summary tokens cannot be located; use a tokenizer whose template supports {% generation %} "
                    "or one whose prompt is a prefix (model.tokenizer_type)"
                )
            masks.append([0] * len(prompt) + [1] * (len(full) - len(prompt)))
    for ids, mask in zip(full_ids, masks, strict=True):
        _strip_trailing_whitespace_tokens(tokenizer, ids, mask)
        if not any(mask):
            raise PipelineError(
                "the chat template produced no assistant tokens for a summary; check model.tokenizer_type"
            )
    return list(zip(full_ids, masks, strict=True))


def summary_token_mask(
    tokenizer: PreTrainedTokenizerBase, instruction: str, dialogue: str, summary: str, date_string: str
) -> tuple[list[int], list[int]]:
    """`summary_token_masks` for one conversation."""
    return summary_token_masks(tokenizer, instruction, [(dialogue, summary)], date_string)[0]


def build_examples(
    tokenizer: PreTrainedTokenizerBase,
    instruction: str,
    pairs: list[tuple[str, str]],
    max_length: int,
    date_string: str,
) -> list[Example | None]:
    """Tokenize training examples, shortening a dialogue (never its summary) to fit `max_length`.

    None for an example where even an empty dialogue leaves no room for the summary.
    """
    examples: list[Example | None] = []
    for (dialogue, summary), (ids, mask) in zip(
        pairs, summary_token_masks(tokenizer, instruction, pairs, date_string), strict=True
    ):
        truncated = len(ids) > max_length
        if truncated:
            shortened = _fit_dialogue(
                tokenizer, dialogue, len(ids) - max_length, max_length,
                lambda d, summary=summary: summary_token_mask(tokenizer, instruction, d, summary, date_string),
            )
            if shortened is None:
                examples.append(None)
                continue
            ids, mask = shortened
        labels = [tok if m else IGNORE_INDEX for tok, m in zip(ids, mask, strict=True)]
        examples.append(Example(input_ids=ids, labels=labels, truncated=truncated))
    return examples


def build_example(
    tokenizer: PreTrainedTokenizerBase,
    instruction: str,
    dialogue: str,
    summary: str,
    max_length: int,
    date_string: str,
) -> Example | None:
    """`build_examples` for one example."""
    return build_examples(tokenizer, instruction, [(dialogue, summary)], max_length, date_string)[0]


def _fit_dialogue(
    tokenizer: PreTrainedTokenizerBase, dialogue: str, overflow: int, max_length: int,
    render: Callable[[str], tuple[list[int], Rendered]],
) -> tuple[list[int], Rendered] | None:
    """`render` (ids first) of the dialogue cut at its end until the ids fit `max_length`, starting `overflow`
    tokens short; None when nothing of the dialogue fits. Training and generation shorten by this one rule."""
    dialogue_ids = _encode(tokenizer, dialogue)
    keep = len(dialogue_ids) - overflow
    while keep > 0:
        # Cut at the end: the opening of a chat sets the topic; decoding and re-encoding may shift a token.
        rendered = render(tokenizer.decode(dialogue_ids[:keep]).rstrip())
        if len(rendered[0]) <= max_length:
            return rendered
        keep -= max(1, len(rendered[0]) - max_length)
    return None


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase, date_string: str) -> list[int]:
    """Token ids that close an assistant turn in this template (e.g. <|eot_id|>), found by rendering one."""
    probe = "ok"
    ids, mask = summary_token_mask(tokenizer, "", "-", probe, date_string)
    labelled = [t for t, m in zip(ids, mask, strict=True) if m]
    content = _encode(tokenizer, probe)
    tail = labelled[len(content):] if labelled[: len(content)] == content else labelled[-1:]
    return tail or labelled[-1:]
