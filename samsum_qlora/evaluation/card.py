"""The adapter's model card, in the Hugging Face format: the metadata, then what the adapter is, its data, its
training, its ROUGE against the untuned base model, how to load it and its limits, every figure from a file an
earlier stage wrote (`inputs`: each such file as a JSON object, and the comparison of both models)."""

from __future__ import annotations

import json

from samsum_qlora.evaluation.card_metadata import NAME, dataset_note, front_matter, hub_id
from samsum_qlora.evaluation.report import ROUGE_NAMES, signed
from samsum_qlora.evaluation.scoring import ROUGE_KEYS
from samsum_qlora.evaluation.uncertainty import CONFIDENCE, includes_zero
from samsum_qlora.params import Params
from samsum_qlora.paths import ADAPTER

ADAPTER_CONFIG = f"{ADAPTER}/adapter_config.json"
SPLITS = ("train", "validation", "test")


def _count(value: float) -> str:
    return f"{value:,}"


def _loss(value: float | None) -> str:
    return f"{value:.4f}" if value is not None else "not logged"


def _table(header: tuple[str, ...], rows: list[tuple]) -> list[str]:
    lines = [f"| {' | '.join(header)} |", "|" + "---|" * len(header)]
    return lines + [f"| {' | '.join(str(cell) for cell in row)} |" for row in rows]


def _base_link(name: str) -> str:
    return f"[`{name}`](https://huggingface.co/{name})" if hub_id(name) else f"`{name}` (a local folder)"


def _source_link(params: Params) -> str:
    source = params.data.source
    if hub_id(source):
        return f"[`{source}`](https://huggingface.co/datasets/{source}) at revision `{params.data.revision}`"
    return f"`{source}` (local files)"


def summary_section(params: Params, inputs: dict) -> list[str]:
    """What the adapter is, in one paragraph, and the model it adapts."""
    q = params.quantization
    lora = inputs["lora"]
    run = inputs["run"]
    headline = inputs["compare"]["rougeL"]
    low, high = (signed(100 * headline[end], 2) for end in ("low", "high"))
    unclear = ", so not distinguishable from no change on this test set" if includes_zero(headline) else ""
    method = (f"QLoRA: the base model frozen in 4-bit {q.bnb_4bit_quant_type.upper()}"
              f"{' with double quantization' if q.bnb_4bit_use_double_quant else ''}, the adapter trained on top"
              if q.use_4bit else "LoRA on the frozen, unquantized base model")
    revision = f" at revision `{params.model.revision}`"
    return [
        f"# {NAME}",
        "",
        f"A LoRA adapter for {_base_link(params.model.base_model)}{revision} that summarizes dialogues, "
        f"trained on {_source_link(params)}. On {inputs['comparison']['examples']} test "
        f"dialogues its ROUGE-L is {100 * headline['tuned']:.2f}, against {100 * headline['base']:.2f} for the "
        f"base model alone ({signed(100 * headline['gain'], 2)} points; {CONFIDENCE:.0%} interval {low} to {high} "
        f"from resampling the test dialogues{unclear}).",
        "",
        "## Model",
        "",
        f"- **Base model:** {_base_link(params.model.base_model)}{revision}",
        f"- **Method:** {method}",
        f"- **LoRA:** rank {lora['r']}, alpha {lora['lora_alpha']} (updates scaled by "
        f"{lora['lora_alpha'] / lora['r']:g}), dropout {lora['lora_dropout']}, on "
        f"{', '.join(f'`{name}`' for name in sorted(lora['target_modules']))}",
        f"- **Trainable parameters:** {_count(run['trainable_params'])} of {_count(run['total_params'])} "
        f"({run['trainable_percent']}%); the adapter file is {run['adapter_mb']} MB",
        "- **Files:** `adapter_config.json` and `adapter_model.safetensors` (PEFT), the tokenizer and its chat "
        "template",
    ]


def data_section(params: Params, inputs: dict) -> list[str]:
    """The dataset, the rows of each split, and how training examples were cut to length."""
    data, tokens = inputs["data"], inputs["tokens"]["train"]
    note = dataset_note(params.data.source)
    lines = ["", "## Data", "", f"{_source_link(params)}{f': {note[1]}' if note else ''}.", ""]
    lines += _table(("split", "rows in the source", "usable", "used"),
                    [(split, _count(data[split]["rows_in"]), _count(data[split]["rows_usable"]),
                      _count(data[split]["rows_out"])) for split in SPLITS])
    lines += [
        "",
        "Rows with a missing or empty dialogue or summary, repeated ids or overlong dialogues are not usable; "
        "fewer rows are used than are usable when the run samples them (`data.*_samples`). Each training example "
        f"is at most {params.prompt.max_length} tokens (`prompt.max_length`): {_count(tokens['truncated'])} of "
        f"{_count(tokens['examples'])} had their dialogue shortened to fit, never their summary. The loss is "
        "computed on the summary tokens only.",
    ]
    return lines


def training_section(params: Params, inputs: dict) -> list[str]:
    """The training run's settings and figures, as a table."""
    train, run, t = inputs["train"], inputs["run"], params.training
    warmup = run["schedule"]["warmup_steps"]
    resumed = f" (resumed from a checkpoint at step {run['resumed_from_step']})" if run["resumed_from_step"] else ""
    rows = [
        ("optimizer steps", f"{_count(run['steps'])}{resumed}"),
        ("epochs", run["epochs"]),
        ("sequences per step", f"{t.per_device_train_batch_size * t.gradient_accumulation_steps} "
                               f"({t.per_device_train_batch_size} × {t.gradient_accumulation_steps} accumulated)"),
        ("learning rate", f"{t.learning_rate:g}, {t.lr_scheduler_type} schedule, {warmup} warm-up "
                          f"step{'' if warmup == 1 else 's'}"),
        ("optimizer", f"`{run['optim']}`"),
        ("tokens trained on (no padding)", _count(run["train_tokens"])),
        ("training time", f"{train['runtime_s']:,.1f} s"),
        ("throughput", f"{train['tokens_per_s']:,.0f} tokens/s"),
        ("device", f"{run['device']}, {run['compute_dtype']} compute, {run['num_processes']} "
                   f"process{'es' if run['num_processes'] > 1 else ''}"),
        ("peak GPU memory" if run["device"] == "cuda" else "peak memory (resident, of the process)",
         f"{train['peak_memory_gib']:.2f} GiB"),
        ("final training loss", _loss(train["train_loss"])),
        ("validation loss", _loss(train["eval_loss"])),
        ("seed", params.seed),
    ]
    return ["", "## Training", "", *_table(("", ""), rows), "",
            "Losses are the mean cross-entropy over summary tokens; the training loss is the last one logged."]


def evaluation_section(params: Params, inputs: dict) -> list[str]:
    """Both models' test ROUGE and summary lengths, and the gain."""
    comparison, adapter = inputs["comparison"], inputs["adapter"]
    scored_in_metadata = hub_id(params.data.source) is not None  # a model-index names a hub dataset
    rows = [(ROUGE_NAMES[key], *(f"{100 * comparison[part][key]:.2f}" for part in ("baseline", "adapter")),
             signed(100 * comparison["delta"][key], 2)) for key in ROUGE_KEYS]
    rows.append(("mean summary length (tokens)", f"{comparison['baseline']['gen_len_mean']:.1f}",
                 f"{comparison['adapter']['gen_len_mean']:.1f}", signed(comparison["delta"]["gen_len_mean"], 1)))
    test_rows = inputs["data"]["test"]["rows_out"]
    scope = f"all {_count(test_rows)}" if comparison["examples"] == test_rows else (
        f"the first {_count(comparison['examples'])} of {_count(test_rows)}")
    lines = [
        "", "## Evaluation", "",
        f"On {scope} test dialogues, the base model alone (baseline) and with this adapter (fine-tuned), both "
        f"prompted the same way, decoding greedily up to {params.eval.max_new_tokens} new tokens. ROUGE F1 with "
        "Porter stemming, in percent, averaged over the dialogues; the gain is in percentage points"
        f"{' (the metadata above holds the fine-tuned scores as fractions)' if scored_in_metadata else ''}.",
        "",
        *_table(("", "baseline", "fine-tuned", "gain"), rows),
    ]
    cut, empty = adapter.get("cut_by_max_new_tokens"), adapter.get("empty_predictions")
    if cut is not None and empty is not None:
        lines += ["", f"Of the fine-tuned model's summaries, {cut} ran out of the {params.eval.max_new_tokens} new "
                      f"tokens before ending and {empty} were empty (they score 0)."]
    return lines


def usage_section(params: Params, inputs: dict) -> list[str]:
    """Code that loads the adapter and prompts it as it was trained."""
    q, p = params.quantization, params.prompt
    if q.use_4bit:
        load = [
            "    quantization_config=BitsAndBytesConfig(",
            f"        load_in_4bit=True, bnb_4bit_quant_type={json.dumps(q.bnb_4bit_quant_type, allow_nan=False)},",
            f"        bnb_4bit_use_double_quant={q.bnb_4bit_use_double_quant}, "
            f"bnb_4bit_compute_dtype=torch.{q.bnb_4bit_compute_dtype}),",
        ]
        imports = "from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig"
        why = ("The base is loaded as in training, in 4 bit, so the adapter runs on the weights it was trained "
               "against; an unquantized base works too, on slightly different weights.")
    else:
        load, imports, why = [], "from transformers import AutoModelForCausalLM, AutoTokenizer", ""
    # The values as Python string literals (JSON's strings are Python's).
    base, revision, date = (json.dumps(v, allow_nan=False) for v in (params.model.base_model, params.model.revision,
                                                                      p.date_string))
    instruction = json.dumps(p.instruction + chr(10) * 2, ensure_ascii=False, allow_nan=False)
    code = [
        "```python",
        "import torch",
        "from peft import PeftModel",
        imports,
        "",
        'adapter = "models/adapter"  # this folder, or the hub repository it is published to',
        "base = AutoModelForCausalLM.from_pretrained(",
        f"    {base}, revision={revision},",
        *load,
        f"    dtype=torch.{q.bnb_4bit_compute_dtype})",
        "model = PeftModel.from_pretrained(base, adapter)",
        "tokenizer = AutoTokenizer.from_pretrained(adapter)",
        "",
        f"messages = [{{\"role\": \"user\", \"content\": {instruction}"
        " + dialogue}]",
        "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\",",
        f"                                       return_dict=True, date_string={date})",
        f"output = model.generate(**inputs.to(model.device), max_new_tokens={params.eval.max_new_tokens}, "
        "do_sample=False)",
        "print(tokenizer.decode(output[0, inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True))",
        "```",
    ]
    return [
        "", "## How to use", "",
        "The prompt is the one the adapter was trained and evaluated with: a single user turn holding the "
        "instruction, a blank line and the dialogue, rendered by the chat template saved with the tokenizer "
        f"(`date_string` fixes the date that Llama 3.x templates print). {why}".rstrip(),
        "",
        *code,
    ]


def limits_section(params: Params, inputs: dict) -> list[str]:
    """What the adapter was not trained or tested for, and what ROUGE does not measure."""
    note = dataset_note(params.data.source)
    domain = note[1] if note else f"the dialogues of `{params.data.source}`"
    schedule = [f"- Its training schedule was unlikely to train well: {warning}."
                for warning in inputs["run"]["schedule"]["warnings"]]
    if shortened := inputs["adapter"].get("shortened_prompts"):  # absent from an older evaluation's file
        schedule.append(f"- {shortened} of {_count(inputs['comparison']['examples'])} test dialogues were longer than "
                        f"prompt.max_length ({params.prompt.max_length} tokens) and were cut at their end, as in "
                        "training.")
    return [
        "", "## Limits", "",
        *schedule,
        f"- Trained and tested only on {domain}: other languages, registers (meetings, transcripts, email) and "
        "much longer conversations are untested.",
        f"- Trained with one instruction (\"{params.prompt.instruction}\"); other instructions are untested.",
        f"- The scores are for greedy decoding with at most {params.eval.max_new_tokens} new tokens; sampling or "
        "another budget gives other summaries.",
        "- ROUGE counts the words and word sequences a summary shares with one reference summary. It does not "
        "measure whether the summary is true to the dialogue: a faithful paraphrase can score low, and a "
        "summary with a wrong name or time can score high.",
        f"- {_count(inputs['comparison']['examples'])} test dialogues measure the mean with some uncertainty; "
        "small gains are within the noise.",
        "- Not assessed for bias or safety; the base model's behaviour and terms of use carry over. No licence is "
        "stated here: those of the base model and of the data apply.",
    ]


def provenance_section() -> list[str]:
    """Which stage wrote the card, and from which files."""
    return [
        "", "## Provenance", "",
        "Written by the `card` stage of the project's DVC pipeline (`dvc repro`) from `params.yaml`, "
        f"`{ADAPTER_CONFIG}` and the metrics files of the run that trained and scored the adapter; "
        "`metrics/compare.md` holds example predictions and plots.",
    ]


def render_card(params: Params, inputs: dict) -> str:
    """The model card: YAML front matter, then the sections."""
    sections = [summary_section, data_section, training_section, evaluation_section, usage_section,
                limits_section]
    lines = [line for section in sections for line in section(params, inputs)] + provenance_section()
    return f"---\n{front_matter(params, inputs['adapter'])}\n---\n\n" + "\n".join(lines) + "\n"
