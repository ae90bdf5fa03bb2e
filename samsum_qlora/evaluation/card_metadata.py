"""The model card's metadata, the YAML front matter the Hugging Face hub reads, built with huggingface_hub's
ModelCardData and EvalResult; and what the card can name by hub id (the hub expects ids there, not local paths)."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import EvalResult, ModelCardData

from samsum_qlora.evaluation.report import ROUGE_NAMES
from samsum_qlora.evaluation.scoring import ROUGE_KEYS
from samsum_qlora.hub import spelled_like_path
from samsum_qlora.params import Params

NAME = "samsum-summarizer"  # the adapter's name in dvc.yaml's `artifacts:` (DVC's model registry)
# What the card can say of a hub dataset beyond the pipeline's files, by the dataset's name (without its owner).
KNOWN_DATASETS = {
    "samsum": ("en", "messenger-like chats in English, written by linguists to resemble everyday conversations, "
                     "each with a short summary"),
}
# The order of the front matter's keys (ModelCardData's own puts `datasets` and `language` before
# `library_name`); the model-index comes last.
KEY_ORDER = ["base_model", "library_name", "datasets", "language", "pipeline_tag", "tags"]


def hub_id(name: str) -> str | None:
    """`name` when it can only be a Hugging Face hub id, else None: the front matter never holds a local path.

    A hub id is `name` or `owner/name` by huggingface_hub's rules (so no `/`, `./`, `~` or drive at the start, no
    third part); such a name is still local when something exists there, when its owner part is a local folder
    (`data/samples` with `data/` here, though `samples` is gone) or when it ends like a data file (`chats.jsonl`)."""
    path = Path(name)
    if spelled_like_path(name) or path.exists() or (len(path.parts) == 2 and Path(path.parts[0]).is_dir()):
        return None
    return name


def dataset_note(source: str) -> tuple[str, str] | None:
    """(language, description) of a known hub dataset, else None."""
    return KNOWN_DATASETS.get(source.rsplit("/", 1)[-1].lower()) if hub_id(source) else None


def eval_results(params: Params, adapter: dict) -> list[EvalResult]:
    """The adapter's test ROUGE as fractions, on the hub dataset it was scored on; none for local data, since a
    model-index names its dataset by hub id."""
    source = hub_id(params.data.source)
    if not source:
        return []
    return [
        EvalResult(task_type="summarization", task_name="Dialogue summarization", dataset_type=source,
                   dataset_name=source, dataset_split="test", dataset_revision=params.data.revision,
                   metric_type=key, metric_name=ROUGE_NAMES[key], metric_value=adapter[key])
        for key in ROUGE_KEYS
    ]


def card_data(params: Params, adapter: dict) -> ModelCardData:
    """The card's metadata. pipeline_tag is text-generation, not summarization: the hub's summarization pipeline
    and widget run sequence-to-sequence models, while this adapter sits on a causal chat model prompted through its
    chat template; summarization is the task of its results and a tag. A local base model or dataset is left out
    (the text names it)."""
    source = hub_id(params.data.source)
    note = dataset_note(params.data.source)
    results = eval_results(params, adapter)
    return ModelCardData(
        base_model=hub_id(params.model.base_model),
        library_name="peft",
        datasets=[source] if source else None,
        language=[note[0]] if note else None,
        pipeline_tag="text-generation",
        tags=["lora", *(["qlora"] if params.quantization.use_4bit else []), "summarization",
              "dialogue-summarization"],
        model_name=NAME if results else None,  # without results it would stand alone as `model_name`
        eval_results=results or None,
    )


def front_matter(params: Params, adapter: dict) -> str:
    """The card's metadata as YAML, in KEY_ORDER."""
    return card_data(params, adapter).to_yaml(original_order=KEY_ORDER)
