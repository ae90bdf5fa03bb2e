"""The card stage: a model card made only of what the pipeline's files say, in the format the hub reads."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from samsum_qlora.errors import PipelineError
from samsum_qlora.evaluation.card import render_card
from samsum_qlora.evaluation.card_metadata import NAME
from samsum_qlora.evaluation.scoring import ROUGE_KEYS
from samsum_qlora.params import parse_params
from stages import card

PARAMS = {
    "seed": 7,
    "model": {"base_model": "meta-llama/Llama-3.2-1B-Instruct", "revision": "0cb88a4f"},
    "quantization": {"use_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                     "bnb_4bit_compute_dtype": "bfloat16"},
    "data": {"source": "knkarthick/samsum", "revision": "b3a2f1c"},
    "prompt": {"instruction": "Sum up this chat.", "max_length": 448, "date_string": "1 Jan 2025"},
    "training": {"per_device_train_batch_size": 12, "gradient_accumulation_steps": 2, "learning_rate": 0.0003,
                 "lr_scheduler_type": "cosine", "warmup_steps": 30},
    "eval": {"max_new_tokens": 56},
}
BASELINE = {"rouge1": 0.3012, "rouge2": 0.0921, "rougeL": 0.2333, "rougeLsum": 0.2401, "gen_len_mean": 40.25,
            "examples": 819, "empty_predictions": 0, "cut_by_max_new_tokens": 17}
ADAPTER = {"rouge1": 0.4867, "rouge2": 0.2311, "rougeL": 0.4012, "rougeLsum": 0.4013, "gen_len_mean": 21.5,
           "examples": 819, "empty_predictions": 2, "cut_by_max_new_tokens": 3}


def split_stats(rows_in: int, usable: int, used: int) -> dict:
    return {"rows_in": rows_in, "rows_usable": usable, "rows_out": used}


FILES = {
    "metrics/train.json": {"train_loss": 1.3579, "eval_loss": 1.4682, "tokens_per_s": 55161.3,
                           "peak_memory_gib": 11.412, "runtime_s": 243.91},
    "metrics/train_run.json": {"steps": 921, "epochs": 1.0, "resumed_from_step": 0, "train_tokens": 3137402,
                               "trainable_params": 851968, "total_params": 1236666368, "trainable_percent": 0.0689,
                               "adapter_mb": 3.415, "device": "cuda", "compute_dtype": "bfloat16",
                               "num_processes": 2, "optim": "paged_adamw_8bit",
                               "schedule": {"examples": 14731, "sequences_per_step": 24, "steps_per_epoch": 614,
                                            "total_steps": 921, "warmup_steps": 30, "peak_learning_rate": 0.0003,
                                            "warnings": []}},
    "metrics/data.json": {"source": "knkarthick/samsum", "train": split_stats(14732, 14731, 14731),
                          "validation": split_stats(818, 818, 818), "test": split_stats(819, 819, 819)},
    "metrics/tokens.json": {"train": {"examples": 14731, "truncated": 25}, "validation": {"examples": 818}},
    "metrics/compare.json": {"rougeL": {"base": 0.2333, "tuned": 0.4012, "gain": 0.1679, "low": 0.1502,
                                        "high": 0.1851}},
    "metrics/baseline.json": BASELINE,
    "metrics/adapter.json": ADAPTER,
    "models/adapter/adapter_config.json": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.1,
                                           "target_modules": ["v_proj", "q_proj"], "peft_type": "LORA"},
}


def write_project(root: Path, params: dict = PARAMS, files: dict = FILES) -> None:
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(json.dumps(content))


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    write_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def front_matter(text: str) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", text, re.DOTALL)
    assert match, text[:200]
    return yaml.safe_load(match.group(1))


def test_front_matter_holds_the_pipelines_values(project):
    card.main()

    text = (project / "models/card/README.md").read_text()
    meta = front_matter(text)
    assert meta["base_model"] == PARAMS["model"]["base_model"]
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "text-generation"
    assert meta["datasets"] == [PARAMS["data"]["source"]]
    assert meta["language"] == ["en"]  # SAMSum is English; a dataset the card does not know gets no language
    assert {"lora", "qlora", "summarization"} <= set(meta["tags"])
    assert "license" not in meta  # nothing in the pipeline's files says which licence applies
    (entry,) = meta["model-index"]
    assert entry["name"] == NAME
    (result,) = entry["results"]
    assert result["task"]["type"] == "summarization"
    assert result["dataset"] == {"name": "knkarthick/samsum", "type": "knkarthick/samsum", "split": "test",
                                 "revision": "b3a2f1c"}
    assert {m["type"]: m["value"] for m in result["metrics"]} == {key: ADAPTER[key] for key in ROUGE_KEYS}


def test_the_hub_reads_the_front_matter(project):
    from huggingface_hub import ModelCard

    card.main()

    parsed = ModelCard((project / "models/card/README.md").read_text())
    assert parsed.data.base_model == PARAMS["model"]["base_model"]
    assert {(r.metric_type, r.metric_value, r.dataset_split) for r in parsed.data.eval_results} == {
        (key, ADAPTER[key], "test") for key in ROUGE_KEYS}


def test_text_gives_the_runs_figures(project):
    card.main()

    text = (project / "models/card/README.md").read_text().split("\n---\n", 1)[1]
    for line in [
        "rank 16, alpha 32 (updates scaled by 2), dropout 0.1, on `q_proj`, `v_proj`",
        "4-bit NF4 with double quantization",
        "851,968 of 1,236,666,368 (0.0689%); the adapter file is 3.415 MB",
        "[`knkarthick/samsum`](https://huggingface.co/datasets/knkarthick/samsum) at revision `b3a2f1c`",
        "| train | 14,732 | 14,731 | 14,731 |",
        "| test | 819 | 819 | 819 |",
        "at most 448 tokens (`prompt.max_length`): 25 of 14,731",
        "| optimizer steps | 921 |",
        "| sequences per step | 24 (12 × 2 accumulated) |",
        "| learning rate | 0.0003, cosine schedule, 30 warm-up steps |",
        "| tokens trained on (no padding) | 3,137,402 |",
        "| training time | 243.9 s |",
        "| throughput | 55,161 tokens/s |",
        "| device | cuda, bfloat16 compute, 2 processes |",
        "| peak GPU memory | 11.41 GiB |",
        "| final training loss | 1.3579 |",
        "| validation loss | 1.4682 |",
        "| seed | 7 |",
        "On all 819 test dialogues",
        "| ROUGE-1 | 30.12 | 48.67 | +18.55 |",
        "| ROUGE-L | 23.33 | 40.12 | +16.79 |",
        "| mean summary length (tokens) | 40.2 | 21.5 | -18.8 |",
        "3 ran out of the 56 new tokens before ending and 2 were empty",
        "its ROUGE-L is 40.12, against 23.33 for the base model alone (+16.79 points; 95% interval +15.02 to "
        "+18.51 from resampling the test dialogues).",
        "greedy decoding with at most 56 new tokens",
        "the gain is in percentage points (the metadata above holds the fine-tuned scores as fractions).",
    ]:
        assert line in text, line


def test_usage_code_prompts_as_the_pipeline_does(project):
    from samsum_qlora.data.prompt import user_content

    card.main()

    code = (project / "models/card/README.md").read_text().split("```python\n", 1)[1].split("```", 1)[0]
    compile(code, "usage", "exec")  # valid Python
    assert '"meta-llama/Llama-3.2-1B-Instruct", revision="0cb88a4f"' in code
    assert 'bnb_4bit_quant_type="nf4"' in code and "bnb_4bit_compute_dtype=torch.bfloat16" in code
    content = re.search(r'"content": (".*?") \+ dialogue', code).group(1)
    assert json.loads(content) + "DIALOGUE" == user_content("Sum up this chat.", "DIALOGUE")
    assert 'date_string="1 Jan 2025"' in code and "max_new_tokens=56" in code


def test_local_model_and_data_are_named_in_the_text_not_in_the_metadata(tmp_path, monkeypatch):
    (tmp_path / "offline/tiny-llama").mkdir(parents=True)
    (tmp_path / "data/samples").mkdir(parents=True)
    params = {**PARAMS, "model": {"base_model": "offline/tiny-llama"}, "data": {"source": "data/samples"},
              "quantization": {"use_4bit": False}}
    write_project(tmp_path, params)
    monkeypatch.chdir(tmp_path)

    card.main()

    text = (tmp_path / "models/card/README.md").read_text()
    meta = front_matter(text)
    # The hub expects ids there, not local paths; a model-index names its dataset by id, so there is none.
    assert not {"base_model", "datasets", "language", "model-index", "model_name"} & set(meta)
    assert "data/samples" not in text.split("\n---\n", 1)[0]
    assert "qlora" not in meta["tags"]
    assert "| ROUGE-L | 23.33 | 40.12 | +16.79 |" in text  # the scores are in the text
    assert "the gain is in percentage points.\n" in text  # and the text does not point at scores in the metadata
    assert "`offline/tiny-llama` (a local folder)" in text and "`data/samples` (local files)" in text
    assert "LoRA on the frozen, unquantized base model" in text and "BitsAndBytesConfig" not in text


# Every way a local base model or dataset is written, existing here or not (EXISTING: this folder's absolute path).
LOCAL_FORMS = ["data/samples", "data/samples/", "data/gone", "./data/samples", "./gone", "../elsewhere/chats",
               "EXISTING", "/no/such/folder", "~/dialogues", "~/gone/chats", "chats.jsonl", "mine/test.csv",
               "a/b/c", "C:\\data\\chats", "D:/chats"]


@pytest.mark.parametrize("form", LOCAL_FORMS)
def test_no_local_path_reaches_the_front_matter(tmp_path, monkeypatch, form):
    from samsum_qlora.evaluation.card_metadata import front_matter as metadata_yaml

    (tmp_path / "data/samples").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    name = str(tmp_path / "data/samples") if form == "EXISTING" else form
    params = parse_params({**PARAMS, "model": {"base_model": name}, "data": {"source": name}})
    written = metadata_yaml(params, ADAPTER)
    assert not {"base_model", "datasets", "language", "model-index", "model_name"} & set(yaml.safe_load(written))
    assert name.rstrip("/") not in written
    # A hub id beside the same folders still reaches it.
    hub = parse_params(PARAMS)
    assert yaml.safe_load(metadata_yaml(hub, ADAPTER))["datasets"] == ["knkarthick/samsum"]


def test_a_local_path_gone_since_the_run_is_still_named_as_local_in_the_text(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "offline").mkdir()
    params = {**PARAMS, "model": {"base_model": "offline/tiny-gone"}, "data": {"source": "data/gone"}}
    write_project(tmp_path, params)
    monkeypatch.chdir(tmp_path)

    card.main()

    text = (tmp_path / "models/card/README.md").read_text()
    assert not {"base_model", "datasets", "model-index"} & set(front_matter(text))
    assert "`offline/tiny-gone` (a local folder)" in text and "`data/gone` (local files)" in text


def test_missing_losses_and_a_resumed_run_are_said(tmp_path, monkeypatch):
    files = {**FILES, "metrics/train.json": {**FILES["metrics/train.json"], "eval_loss": None, "train_loss": None},
             "metrics/train_run.json": {**FILES["metrics/train_run.json"], "resumed_from_step": 500}}
    write_project(tmp_path, files=files)
    monkeypatch.chdir(tmp_path)

    card.main()

    text = (tmp_path / "models/card/README.md").read_text()
    assert "| validation loss | not logged |" in text and "| final training loss | not logged |" in text
    assert "| optimizer steps | 921 (resumed from a checkpoint at step 500) |" in text


def test_schedule_warnings_are_limits(tmp_path, monkeypatch):
    warning = "only 44 optimizer steps (fewer than 100): raise training.num_train_epochs"
    schedule = {**FILES["metrics/train_run.json"]["schedule"], "total_steps": 44, "warnings": [warning]}
    write_project(tmp_path, files={**FILES, "metrics/train_run.json": {**FILES["metrics/train_run.json"],
                                                                        "schedule": schedule}})
    monkeypatch.chdir(tmp_path)

    card.main()

    limits = (tmp_path / "models/card/README.md").read_text().split("## Limits", 1)[1]
    assert f"- Its training schedule was unlikely to train well: {warning}." in limits
    assert "were cut at their end" not in limits  # no test dialogue was


def test_shortened_test_dialogues_are_a_limit(tmp_path, monkeypatch):
    write_project(tmp_path, files={**FILES, "metrics/adapter.json": {**ADAPTER, "shortened_prompts": 3}})
    monkeypatch.chdir(tmp_path)

    card.main()

    limits = (tmp_path / "models/card/README.md").read_text().split("## Limits", 1)[1]
    assert ("- 3 of 819 test dialogues were longer than prompt.max_length (448 tokens) and were cut at their end, as "
            "in training.") in limits


@pytest.mark.parametrize(
    ("missing", "stage"),
    [
        ("metrics/train.json", "train"),
        ("metrics/train_run.json", "train"),
        ("metrics/data.json", "prepare"),
        ("metrics/tokens.json", "tokenize_mask"),
        ("metrics/compare.json", "compare"),
        ("metrics/baseline.json", "evaluate_baseline"),
        ("metrics/adapter.json", "evaluate_adapter"),
        ("models/adapter/adapter_config.json", "train"),
    ],
)
def test_a_missing_file_names_itself_its_stage_and_dvc_repro(project, missing, stage):
    (project / missing).unlink()

    with pytest.raises(PipelineError, match=re.escape(f"{missing} not found: it is written by the `{stage}` stage; "
                                                      "run `dvc repro`")):
        card.main()
    assert not (project / "models/card/README.md").exists()


def test_the_stage_reports_a_missing_file_in_one_line(project):
    (project / "metrics/train_run.json").unlink()

    proc = subprocess.run([sys.executable, "-m", "stages.card"], cwd=project, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})

    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: metrics/train_run.json not found: it is written by the `train` stage; run `dvc repro` first"]


def test_compare_and_card_load_no_model_library():
    """Neither stage loads a model: they start without torch, transformers or peft (and draw with matplotlib only
    when they draw)."""
    heavy = ("torch", "transformers", "peft", "matplotlib", "scipy")
    code = f"import sys, stages.compare, stages.card; print([m for m in {heavy!r} if m in sys.modules])"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)

    assert proc.stdout.strip() == "[]"


def test_an_older_file_without_a_key_is_named(project):
    run = {key: value for key, value in FILES["metrics/train_run.json"].items() if key != "train_tokens"}
    (project / "metrics/train_run.json").write_text(json.dumps(run))

    with pytest.raises(PipelineError, match=r"metrics/train_run.json has no `train_tokens`.*`dvc repro`"):
        card.main()


def test_a_rouge_l_interval_that_includes_zero_is_said(project):
    headline = {"base": 0.2333, "tuned": 0.4012, "gain": 0.1679, "low": -0.0012, "high": 0.3301}
    (project / "metrics/compare.json").write_text(json.dumps({"rougeL": headline}))

    card.main()

    assert ("(+16.79 points; 95% interval -0.12 to +33.01 from resampling the test dialogues, so not "
            "distinguishable from no change on this test set)") in (project / "models/card/README.md").read_text()


def test_an_older_compare_json_without_the_interval_is_named(project):
    (project / "metrics/compare.json").write_text(json.dumps({"rougeL": {"base": 0.2333, "tuned": 0.4012,
                                                                         "gain": 0.1679}}))

    with pytest.raises(PipelineError, match=r"metrics/compare.json has no `rougeL.low`: it is from an older "
                                            r"`compare` stage; run `dvc repro`"):
        card.main()


def test_files_of_different_runs_are_refused(project):
    (project / "metrics/compare.json").write_text(json.dumps({"rougeL": {"base": 0.2333, "tuned": 0.39,
                                                                         "gain": 0.1567, "low": 0.14, "high": 0.17}}))

    with pytest.raises(PipelineError, match="are from different runs; run `dvc repro`"):
        card.main()


def _leaves(section: object, prefix: str = "") -> list[str]:
    keys = []
    for field in dataclasses.fields(section):
        value = getattr(section, field.name)
        keys += _leaves(value, f"{prefix}{field.name}.") if dataclasses.is_dataclass(value) else [prefix + field.name]
    return keys


def _changed(params: object, dotted: str) -> object:
    """`params` with the value at `dotted` changed (no validation: the card only has to render it)."""
    head, _, rest = dotted.partition(".")
    value = getattr(params, head)
    if rest:
        return dataclasses.replace(params, **{head: _changed(value, rest)})
    if isinstance(value, bool):
        new = not value
    elif isinstance(value, (int, float)):
        new = value * 2 + 1
    elif isinstance(value, list):
        new = [*value, "o_proj"]
    else:
        new = f"{value}x" if value is not None else "x"
    return dataclasses.replace(params, **{head: new})


def test_the_card_reads_exactly_the_params_its_stage_lists(project):
    """dvc.yaml's params of `card` are what re-runs it: a param it reads and does not list would leave a stale
    card, one it lists and does not read would re-run it for nothing."""
    listed = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["card"]["params"]
    params = parse_params(PARAMS)
    inputs = card.read_inputs()
    before = render_card(params, inputs)
    read = [key for key in _leaves(params) if render_card(_changed(params, key), inputs) != before]
    covered = [key for key in _leaves(params) if any(key == entry or key.startswith(f"{entry}.") for entry in listed)]
    assert read == covered
