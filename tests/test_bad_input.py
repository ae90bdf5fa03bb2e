"""Bad input, stage by stage, as a user meets it: `python -m stages.<name>` in a project folder.

Each failing case must end with exit code 1 and one `error:` line (the last line on stderr, no traceback)
naming the file, row or param and what to do, and must leave every file in the project as it was: no
partial output, earlier outputs byte for byte intact, no temporary files. Row-level problems are not errors:
the rows are skipped and counted in metrics/data.json. Function-level checks of the same messages live in
test_prepare.py and test_params.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import TINY_MODEL, offline_params
from stages.errors import PipelineError

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "data" / "samples"
# What earlier runs left behind; every failing stage must leave these exactly as they were.
EARLIER_OUTPUTS = {
    "metrics/data.json": '{"earlier": "prepare"}\n',
    "metrics/tokens.json": '{"earlier": "tokenize_mask"}\n',
    "metrics/train.json": '{"earlier": "train"}\n',
    "metrics/baseline.json": '{"earlier": "evaluate_baseline"}\n',
    "metrics/adapter.json": '{"earlier": "evaluate_adapter"}\n',
    "data/predictions/baseline.jsonl": '{"id": "earlier"}\n',
    "data/predictions/adapter.jsonl": '{"id": "earlier"}\n',
    "data/tokenized/dataset_dict.json": '{"splits": ["earlier"]}\n',
}


def sample_rows(split: str, n: int) -> list[dict[str, Any]]:
    return json.loads((SAMPLES / f"{split}.json").read_text(encoding="utf-8"))[:n]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def stage_project(root: Path, **sections: dict) -> Path:
    """A project folder with params, prepared data and earlier outputs of every stage."""
    root.mkdir(parents=True, exist_ok=True)
    params = offline_params(model={"base_model": str(TINY_MODEL)}, data={"source": "mydata"},
                            eval={"max_samples": 2, "max_new_tokens": 8}, **sections)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    for split, n in (("train", 8), ("validation", 4), ("test", 4)):
        write_jsonl(root / "mydata" / f"{split}.jsonl", sample_rows(split, n))
        write_jsonl(root / "data" / "prepared" / f"{split}.jsonl", sample_rows(split, n))
    for name, text in EARLIER_OUTPUTS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return root


def set_params(root: Path, **changes: Any) -> None:
    """Set dotted keys in the project's params.yaml, e.g. set_params(root, **{"eval.max_new_tokens": 0})."""
    params = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8"))
    for dotted, value in changes.items():
        *sections, key = dotted.split(".")
        target = params
        for section in sections:
            target = target.setdefault(section, {})
        target[key] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under `root`."""
    return {p.relative_to(root).as_posix(): p.read_bytes() if p.is_file() else None for p in root.rglob("*")}


def run(root: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", *args], cwd=root, env=env, capture_output=True, text=True,
                          timeout=timeout)


def error_line(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """The one `error:` line of a failed stage, checked to be its last line and to hold every fragment."""
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert proc.stderr.rstrip().splitlines()[-1] == errors[0]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def fails_cleanly(root: Path, args: tuple[str, ...], *fragments: str) -> subprocess.CompletedProcess:
    """Run a stage that must fail; check its message and that no file in the project changed."""
    before = snapshot(root)
    proc = run(root, *args)
    error_line(proc, *fragments)
    after = snapshot(root)
    assert after.keys() == before.keys(), f"files added/removed: {sorted(after.keys() ^ before.keys())}"
    changed = [name for name in before if before[name] != after[name]]
    assert not changed, f"files changed: {changed}"
    return proc


# --- data -----------------------------------------------------------------------------------------------------


def _break_jsonl_line(data: Path) -> None:
    with (data / "validation.jsonl").open("a", encoding="utf-8") as f:
        f.write('{"dialogue": "Ann: cut off", "summ\n')


def _parquet_without_dialogue(data: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (data / "test.jsonl").unlink()
    pq.write_table(pa.Table.from_pylist([{"id": "1", "text": "Ann: hi", "summary": "Ann says hi."}]),
                   data / "test.parquet")


def _csv_without_summary(data: Path) -> None:
    (data / "train.jsonl").unlink()
    (data / "train.csv").write_text("id,dialogue,gist\n1,Ann: hi,Ann says hi.\n", encoding="utf-8")


def _invalid_utf8(data: Path) -> None:
    (data / "train.jsonl").write_bytes(b'{"dialogue": "Ann: hi", "summary": "ok"}\n'
                                       b'{"dialogue": "Ann: caf\xe9", "summary": "ok"}\n')


def _empty_file(data: Path) -> None:
    (data / "test.jsonl").write_bytes(b"")


def _no_usable_rows(data: Path) -> None:
    write_jsonl(data / "validation.jsonl", [{"dialogue": "   ", "summary": "s"}, {"dialogue": None, "summary": "s"},
                                            {"dialogue": "Ann: hi", "summary": 3}])


@pytest.mark.parametrize(
    ("damage", "fragments"),
    [
        (_break_jsonl_line, ("mydata/validation.jsonl:5: not valid JSON",)),
        (_parquet_without_dialogue, ("mydata/test.parquet has no column 'dialogue'", "columns found: id, text, summary",
                                     "data.dialogue_column")),
        (_csv_without_summary, ("mydata/train.csv has no column 'summary'", "columns found: id, dialogue, gist",
                                "data.summary_column")),
        (_invalid_utf8, ("mydata/train.jsonl:2: not valid UTF-8", "0xe9", "re-save the file as UTF-8")),
        (_empty_file, ("mydata/test.jsonl is empty", "data.source")),
        (_no_usable_rows, ("the validation split (mydata/validation.jsonl) has no usable rows out of 3",
                           "dialogue_missing=1", "dialogue_empty=1", "summary_not_text=1")),
    ],
    ids=["broken-jsonl-line", "parquet-without-column", "csv-without-column", "invalid-utf8", "empty-file",
         "no-usable-rows"],
)
def test_prepare_rejects_bad_data_files(tmp_path, damage, fragments):
    root = stage_project(tmp_path)
    damage(root / "mydata")
    fails_cleanly(root, ("stages.prepare",), *fragments)


def test_prepare_names_a_missing_source_path(tmp_path):
    root = stage_project(tmp_path)
    set_params(root, **{"data.source": "mydata/all.jsonl"})
    fails_cleanly(root, ("stages.prepare",), "data.source 'mydata/all.jsonl' does not exist")


def test_unreachable_hub_dataset_says_how_to_use_local_files(tmp_path):
    root = stage_project(tmp_path)
    set_params(root, **{"data.source": "nobody/no-such-dialogues"})
    fails_cleanly(root, ("stages.prepare",), "could not load hub dataset 'nobody/no-such-dialogues'",
                  "-S data.source=path/to/folder")


def test_unusable_rows_are_skipped_and_counted(tmp_path):
    root = stage_project(tmp_path)
    good = sample_rows("train", 3)
    bad = [
        {"id": "long", "dialogue": "Ann: " + "la " * 33_333, "summary": "Ann sings."},  # 100,000 characters
        {"id": "null", "dialogue": None, "summary": "s"},
        {"id": "blank", "dialogue": " \n\t ", "summary": "s"},
        {"id": "number", "dialogue": 42, "summary": "s"},
        {"id": "no-summary", "dialogue": "Ann: hi", "summary": ""},
        {**good[1], "dialogue": "Bob: the same id again"},
    ]
    assert len(bad[0]["dialogue"]) >= 100_000
    write_jsonl(root / "mydata" / "train.jsonl", [good[0], good[1], *bad, good[2]])
    proc = run(root, "stages.prepare")
    assert proc.returncode == 0, proc.stderr[-3000:]
    kept = [json.loads(line)["id"] for line in (root / "data/prepared/train.jsonl").read_text().splitlines()]
    assert kept == [row["id"] for row in good]
    train = json.loads((root / "metrics/data.json").read_text())["train"]
    assert (train["rows_in"], train["rows_out"]) == (9, 3)
    assert {k: v for k, v in train["dropped"].items() if v} == {
        "dialogue_too_long": 1, "dialogue_missing": 1, "dialogue_empty": 1, "dialogue_not_text": 1,
        "summary_empty": 1, "duplicate_id": 1}
    assert "train: 9 rows in, 3 out" in proc.stderr


# --- params ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "fragments"),
    [
        ({"data.sorce": "x"}, ("params.yaml: unknown key data.sorce; did you mean data.source?",)),
        ({"seed": "forty-two"}, ("params.yaml: seed is 'forty-two' (str); expected an integer",)),
        ({"data.train_samples": -5}, ("params.yaml: data.train_samples is -5; expected null (all rows) or an "
                                      "integer > 0",)),
        ({"quantization.bnb_4bit_quant_type": "int8"},
         ("params.yaml: quantization.bnb_4bit_quant_type is 'int8'; expected one of nf4, fp4",)),
        ({"quantization.bnb_4bit_compute_dtype": "fp8"},
         ("params.yaml: quantization.bnb_4bit_compute_dtype is 'fp8'; expected one of bfloat16, float16, float32",)),
    ],
    ids=["unknown-key", "wrong-type", "out-of-range", "quant-type", "compute-dtype"],
)
def test_bad_params_stop_a_stage_before_it_does_anything(tmp_path, changes, fragments):
    # Every stage validates the whole params.yaml when it starts; prepare is the quickest to start.
    root = stage_project(tmp_path)
    set_params(root, **changes)
    fails_cleanly(root, ("stages.prepare",), *fragments)


def test_generation_budget_must_be_positive(tmp_path):
    root = stage_project(tmp_path)
    set_params(root, **{"eval.max_new_tokens": 0})  # negative values: test_params.py
    fails_cleanly(root, ("stages.evaluate", "baseline"),
                  "params.yaml: eval.max_new_tokens is 0; expected an integer > 0")


# --- model ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base_model", "fragments"),
    [
        ("{tmp}/models/llama-1b", ("model.base_model '{tmp}/models/llama-1b' does not exist",
                                   "a folder made by save_pretrained")),
        ("offline/no-such-model", ("could not load model.base_model 'offline/no-such-model' from the Hugging Face hub",
                                   "no local folder of that name exists", "hf auth login",
                                   "set model.base_model to a folder made by save_pretrained")),
    ],
    ids=["missing-local-dir", "unreachable-hub-id"],
)
def test_missing_model_says_where_it_was_looked_for(tmp_path, base_model, fragments):
    root = stage_project(tmp_path)
    set_params(root, **{"model.base_model": base_model.format(tmp=tmp_path)})
    fails_cleanly(root, ("stages.tokenize_mask",), *(f.format(tmp=tmp_path) for f in fragments))


def test_tokenizer_without_chat_template(tmp_path):
    plain = tmp_path / "plain-model"
    shutil.copytree(TINY_MODEL, plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    root = stage_project(tmp_path / "project")
    set_params(root, **{"model.base_model": str(plain)})
    fails_cleanly(root, ("stages.tokenize_mask",), f"the tokenizer of '{plain}' (model.base_model) has no chat "
                  "template", "set model.tokenizer_type to an instruct/chat model's tokenizer")


def test_damaged_local_model_weights_ask_for_a_complete_folder(tmp_path):
    from stages.modeling import choose_device, load_base_model
    from stages.params import ModelParams, QuantizationParams

    damaged = tmp_path / "model"
    shutil.copytree(TINY_MODEL, damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a download cut short
    quant = QuantizationParams(use_4bit=False)
    with pytest.raises(PipelineError) as err:
        load_base_model(ModelParams(base_model=str(damaged)), quant, choose_device(quant))
    assert str(err.value).startswith(f"model.base_model '{damaged}' could not be loaded (")
    assert "it must be a complete folder made by save_pretrained" in str(err.value)


def test_evaluating_without_an_adapter_names_the_stage_to_run(tmp_path):
    root = stage_project(tmp_path)
    fails_cleanly(root, ("stages.evaluate", "adapter"), "models/adapter/ has no adapter_config.json",
                  "run `dvc repro train`")


def _tiny_adapter(folder: Path) -> None:
    """A real (untrained) LoRA adapter for the tiny model, saved the way train saves one."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(TINY_MODEL)
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")).save_pretrained(folder)


@pytest.mark.slow
def test_evaluating_a_corrupted_adapter_says_how_to_restore_it(tmp_path):
    root = stage_project(tmp_path)
    adapter = root / "models" / "adapter"
    _tiny_adapter(adapter)
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])  # a copy cut short
    fails_cleanly(root, ("stages.evaluate", "adapter"), "models/adapter/ could not be loaded",
                  "`dvc checkout models/adapter`", "`dvc repro -f train`")


def test_adapter_without_safetensors_weights_is_refused(tmp_path):
    from stages.evaluate import check_adapter

    _tiny_adapter(tmp_path / "adapter")
    (tmp_path / "adapter" / "adapter_model.safetensors").rename(tmp_path / "adapter" / "adapter_model.bin")
    with pytest.raises(PipelineError, match=r"has no adapter_model\.safetensors: run `dvc repro train`"):
        check_adapter(str(tmp_path / "adapter"))


def _tokenize(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stages import tokenize_mask

    monkeypatch.chdir(root)
    tokenize_mask.main()
    monkeypatch.chdir(ROOT)


def _checkpoint_of_this_run(root: Path) -> Path:
    """models/checkpoints/ marked with the fingerprint of the project's params and data, so train resumes it."""
    from stages.params import load_params
    from stages.train import RUN_FINGERPRINT, run_fingerprint

    folder = root / "models" / "checkpoints"
    (folder / "checkpoint-2").mkdir(parents=True)
    fingerprint = run_fingerprint(load_params(root / "params.yaml"), root / "data" / "tokenized")
    (folder / RUN_FINGERPRINT).write_text(json.dumps({"fingerprint": fingerprint}) + "\n")
    return folder / "checkpoint-2"


TRAIN_SMALL = {"training": {"max_steps": 2, "save_steps": 1, "eval_steps": 1, "logging_steps": 1}}


@pytest.mark.slow
def test_corrupted_checkpoint_says_how_to_start_clean(tmp_path, monkeypatch):
    root = stage_project(tmp_path, **TRAIN_SMALL)
    _tokenize(root, monkeypatch)
    checkpoint = _checkpoint_of_this_run(root)
    (checkpoint / "trainer_state.json").write_text('{"global_step": 2, "log_hist')  # cut off mid-write
    _tiny_adapter(root / "models" / "adapter")  # the adapter of the earlier, complete run
    before = snapshot(root)
    proc = run(root, "stages.train")
    error_line(proc, "could not resume from models/checkpoints/checkpoint-2", "JSONDecodeError",
               "delete models/checkpoints/ to start clean")
    after = snapshot(root)
    # train may start its curves before it resumes; everything else, the checkpoints included, stays.
    curves = ("metrics/curves", "metrics/curves/")
    kept = {name: data for name, data in after.items() if not (name == curves[0] or name.startswith(curves[1]))}
    assert kept == before


@pytest.mark.slow
def test_checkpoint_with_damaged_weights_says_how_to_start_clean(tmp_path, monkeypatch):
    from stages import train

    root = stage_project(tmp_path, **TRAIN_SMALL)
    _tokenize(root, monkeypatch)
    checkpoint = _checkpoint_of_this_run(root)
    (checkpoint / "trainer_state.json").write_text('{"global_step": 2}')
    (checkpoint / "adapter_model.safetensors").write_bytes(b"\x00\xff" * 100)
    monkeypatch.chdir(root)
    with pytest.raises(PipelineError, match="could not resume from .*delete models/checkpoints/ to start clean"):
        train.main()


def test_damaged_checkpoint_marker_means_a_clean_start(tmp_path):
    from stages.train import RUN_FINGERPRINT, checkpoint_to_resume

    folder = tmp_path / "checkpoints"
    (folder / "checkpoint-4").mkdir(parents=True)
    (folder / RUN_FINGERPRINT).write_text('{"fingerp')  # cut off: which run its checkpoints belong to is unknown
    assert checkpoint_to_resume("aaa", folder) is None
    assert not (folder / "checkpoint-4").exists()
    assert json.loads((folder / RUN_FINGERPRINT).read_text()) == {"fingerprint": "aaa"}


@pytest.mark.slow
def test_unknown_lora_targets_list_the_models_layers_after_one_device_line(tmp_path, monkeypatch):
    root = stage_project(tmp_path, lora={"target_modules": ["q_proj", "query_key_value"]})
    _tokenize(root, monkeypatch)
    (root / "models" / "adapter").mkdir(parents=True)
    (root / "models" / "adapter" / "adapter_config.json").write_text('{"earlier": "train"}\n')
    proc = fails_cleanly(root, ("stages.train",), "lora.target_modules names ['query_key_value']",
                         "its linear layers are: ", *(f"{name}_proj" for name in "qkvo"))
    # The offline profile keeps the GPU settings (bf16 compute, paged 8-bit Adam): on a CPU they fall back,
    # said once in the log, and the run goes on to the real problem rather than crashing on them.
    device_lines = [line for line in proc.stderr.splitlines() if "device:" in line]
    assert len(device_lines) == 1, proc.stderr[-3000:]
    assert "float32 compute instead of bfloat16" in device_lines[0]
    assert "adamw_torch instead of paged_adamw_8bit" in device_lines[0]


# --- environment ----------------------------------------------------------------------------------------------


def test_cuda_only_settings_fall_back_on_cpu_with_a_reason(monkeypatch):
    import torch

    from stages.modeling import choose_device
    from stages.params import QuantizationParams

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    policy = choose_device(QuantizationParams(bnb_4bit_compute_dtype="bfloat16"), "paged_adamw_8bit")
    assert (policy.device, policy.compute_dtype, policy.optim, policy.bf16) == ("cpu", torch.float32, "adamw_torch",
                                                                                False)
    assert "\n" not in policy.reason
    assert "float32 compute instead of bfloat16 (faster on CPU)" in policy.reason
    assert "adamw_torch instead of paged_adamw_8bit (the paged 8-bit optimizers need CUDA)" in policy.reason

    kept = choose_device(QuantizationParams(bnb_4bit_compute_dtype="float32"), "adamw_torch")
    assert (kept.optim, kept.reason) == ("adamw_torch", "no CUDA device, running on CPU")
    assert choose_device(QuantizationParams(), "adafactor").optim == "adafactor"  # runs on CPU: kept


# --- generation -----------------------------------------------------------------------------------------------


def test_decoding_flags_budget_cuts_and_blank_outputs(tiny_tokenizer):
    from stages.evaluate import _decode

    eot = tiny_tokenizer.convert_tokens_to_ids("<|eot_id|>")
    words = tiny_tokenizer("Anna will call Tom.", add_special_tokens=False)["input_ids"]
    blank = tiny_tokenizer(" \n\n ", add_special_tokens=False)["input_ids"]
    assert blank
    cut = _decode(tiny_tokenizer, words[:3], [eot])  # ran out of eval.max_new_tokens mid-sentence
    assert (cut.new_tokens, cut.stopped) == (3, False) and cut.text
    assert _decode(tiny_tokenizer, [*blank, eot], [eot]).text == ""  # only whitespace: an empty prediction
    pad = tiny_tokenizer.pad_token_id
    finished_early = _decode(tiny_tokenizer, [*words, eot, pad, pad], [eot])  # batch-mates kept generating
    assert (finished_early.text, finished_early.new_tokens, finished_early.stopped) == ("Anna will call Tom.",
                                                                                         len(words), True)


def test_metrics_count_empty_and_cut_predictions_and_score_empty_as_zero():
    from stages.evaluate import Generation, summarize_generations
    from stages.scoring import ROUGE_KEYS

    generations = [
        Generation("Anna will call Tom tonight.", 6, True),
        Generation("", 0, True),  # the model ended its turn at once
        Generation("Tom and Anna talk about the", 48, False),  # cut by eval.max_new_tokens
        Generation("", 48, False),  # 48 tokens that decode to nothing (e.g. whitespace): empty and cut
    ]
    references = ["Anna will call Tom tonight.", "Tom is late.", "Tom and Anna talk about the trip.", "Bye."]
    per_example, metrics = summarize_generations(generations, references, seconds=2.0)

    assert per_example[0] == dict.fromkeys(ROUGE_KEYS, 1.0)
    assert per_example[1] == per_example[3] == dict.fromkeys(ROUGE_KEYS, 0.0)
    assert 0 < per_example[2]["rouge1"] < 1
    for key in ROUGE_KEYS:  # empty predictions pull the mean down rather than being left out
        assert metrics[key] == pytest.approx((1.0 + per_example[2][key]) / 4, abs=1e-6)
    assert (metrics["examples"], metrics["empty_predictions"], metrics["cut_by_max_new_tokens"]) == (4, 2, 2)
    assert metrics["gen_len_mean"] == 25.5
    assert (metrics["seconds"], metrics["examples_per_second"]) == (2.0, 2.0)
    json.dumps(metrics)  # plain JSON for metrics/<which>.json
