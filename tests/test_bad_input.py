"""Bad input, stage by stage, as a user meets it: `python -m stages.<name>` in a project folder.

Each failing case must end with exit code 1 and one `error:` line (the last line on stderr, no traceback)
naming the file, row or param and what to do, and must leave every file in the project as it was: no
partial output, earlier outputs byte for byte intact, no temporary files. Row-level problems are not errors:
the rows are skipped and counted in metrics/data.json. Function-level checks of the same messages live in
test_prepare.py and test_params.py.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import TINY_MODEL, offline_params
from samsum_qlora.errors import PipelineError

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "data" / "samples"
# What earlier runs left behind; every failing stage must leave these exactly as they were.
EARLIER_OUTPUTS = {
    "metrics/data.json": '{"earlier": "prepare"}\n',
    "metrics/tokens.json": '{"earlier": "tokenize_mask"}\n',
    "metrics/train.json": '{"earlier": "train"}\n',
    "metrics/train_run.json": '{"earlier": "train"}\n',
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


def run(root: Path, *args: str, timeout: int = 300, env: dict[str, str | None] | None = None
        ) -> subprocess.CompletedProcess:
    """`python -m <args>` in `root`, with `env` changing the environment (None removes a variable)."""
    changes = {"PYTHONPATH": str(ROOT), **(env or {})}
    environment = {**os.environ, **changes}
    environment = {name: value for name, value in environment.items() if value is not None}
    return subprocess.run([sys.executable, "-m", *args], cwd=root, env=environment, capture_output=True, text=True,
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


def fails_cleanly(root: Path, args: tuple[str, ...], *fragments: str, env: dict[str, str | None] | None = None
                  ) -> subprocess.CompletedProcess:
    """Run a stage that must fail; check its message and that no file in the project changed."""
    before = snapshot(root)
    proc = run(root, *args, env=env)
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
        ("./llama-1b", ("model.base_model './llama-1b' does not exist", "a folder made by save_pretrained")),
    ],
    ids=["missing-local-dir", "missing-relative-dir"],
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
    from samsum_qlora.model.loading import choose_device, load_base_model
    from samsum_qlora.params import ModelParams, QuantizationParams

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
                  "`dvc checkout --force models/adapter` (seconds", "`dvc repro -f train` (trains again from scratch)")


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
    from samsum_qlora.params import load_params
    from samsum_qlora.training.checkpoints import RUN_FINGERPRINT, run_fingerprint

    folder = root / "models" / "checkpoints"
    (folder / "checkpoint-2").mkdir(parents=True)
    fingerprint = run_fingerprint(load_params(root / "params.yaml"), root / "data" / "tokenized")
    (folder / RUN_FINGERPRINT).write_text(json.dumps({"fingerprint": fingerprint}) + "\n")
    return folder / "checkpoint-2"


TRAIN_SMALL = {"training": {"max_steps": 2, "save_steps": 1, "eval_steps": 1, "logging_steps": 1}}


@pytest.mark.slow
def test_corrupted_checkpoint_is_passed_over_and_training_starts_clean(tmp_path, monkeypatch):
    root = stage_project(tmp_path, **TRAIN_SMALL)
    _tokenize(root, monkeypatch)
    checkpoint = _checkpoint_of_this_run(root)
    (checkpoint / "trainer_state.json").write_text('{"global_step": 2, "log_hist')  # cut off mid-write
    proc = run(root, "stages.train")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("passed over models/checkpoints/checkpoint-2, which cannot be resumed: trainer_state.json does not parse "
            "(JSONDecodeError)") in proc.stderr
    assert "resuming from" not in proc.stderr
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == 2  # this run's own


@pytest.mark.slow
def test_checkpoint_that_fails_to_restore_is_set_aside_for_the_older_one(tmp_path, monkeypatch):
    from conftest import complete_checkpoint
    from stages import train

    root = stage_project(tmp_path, **TRAIN_SMALL)
    _tokenize(root, monkeypatch)
    checkpoint = _checkpoint_of_this_run(root)
    complete_checkpoint(checkpoint.with_name("checkpoint-1"))
    complete_checkpoint(checkpoint)  # every file is there, but optimizer.pt is not a torch file
    monkeypatch.chdir(root)
    with pytest.raises(PipelineError, match=(
            r"could not resume from models/checkpoints/checkpoint-2 \(.*\); it was moved aside to "
            r"models/checkpoints/checkpoint-2\.damaged and running the same command again resumes from the next "
            r"older complete checkpoint, models/checkpoints/checkpoint-1$")):
        train.main()
    assert not checkpoint.exists() and (checkpoint.with_name("checkpoint-2.damaged") / "optimizer.pt").is_file()


def test_damaged_checkpoint_marker_means_a_clean_start(tmp_path):
    from samsum_qlora.training.checkpoints import RUN_FINGERPRINT, checkpoint_to_resume

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


# --- the Hugging Face hub: offline, unreachable, or reachable --------------------------------------------------

CLOSED_PORT = "http://127.0.0.1:9"  # the discard port: refused at once, and nothing leaves the machine
NO_OFFLINE_MODE = {"HF_HUB_OFFLINE": None, "HF_DATASETS_OFFLINE": None, "TRANSFORMERS_OFFLINE": None}
# How a machine meets a hub it can't use: offline mode set (as the test suite and the offline profile do),
# or offline mode off and the hub's address not answering. Each: environment changes, the reason given.
NO_HUB = {
    "offline-mode": ({**NO_OFFLINE_MODE, "HF_HUB_OFFLINE": "1"}, "offline mode is set (HF_HUB_OFFLINE=1)"),
    "hub-unreachable": ({**NO_OFFLINE_MODE, "HF_ENDPOINT": CLOSED_PORT}, f"the hub is unreachable at {CLOSED_PORT}"),
}


def hf_home(folder: Path) -> dict[str, str]:
    """Hugging Face caches under `folder`, so that what this machine has downloaded plays no part."""
    return {"HF_HOME": str(folder), "HF_HUB_CACHE": str(folder / "hub"), "HF_DATASETS_CACHE": str(folder / "datasets")}


def cache_as_download(model: Path, repo_id: str, hub_cache: Path) -> None:
    """Put a saved model folder into the hub cache the way a download of `repo_id` at `main` leaves it."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    snapshot_dir = repo / "snapshots" / commit
    snapshot_dir.mkdir(parents=True)
    for file in model.iterdir():
        blob = hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, repo / "blobs" / blob)
        (snapshot_dir / file.name).symlink_to(Path("..", "..", "blobs", blob))


def assert_fixes_work_for_any_command(line: str) -> None:
    """The advice fits `dvc repro` and `python -m stages.<name>` alike: `-S` only inside a `dvc exp run` command."""
    assert "in params.yaml" in line and "`python -m offline.run`" in line, line
    commands = re.findall(r"`([^`]*)`", line)
    assert "-S " not in re.sub(r"`[^`]*`", "", line), line
    assert [c for c in commands if "-S " in c], line
    assert all(c.startswith("dvc exp run ") for c in commands if "-S " in c), line


def assert_no_retries(stderr: str) -> None:
    assert "Retrying in" not in stderr and "thrown while requesting" not in stderr, stderr[-3000:]


@pytest.mark.parametrize("no_hub", NO_HUB)
@pytest.mark.parametrize(
    ("stage", "param", "hub_id", "subject"),
    [
        (("stages.prepare",), "data.source", "nobody/no-such-dialogues",
         "could not load hub dataset 'nobody/no-such-dialogues' at revision 'main' (data.source): "),
        (("stages.tokenize_mask",), "model.base_model", "nobody/no-such-chat-model",
         "could not load model.base_model 'nobody/no-such-chat-model' from the Hugging Face hub: "),
    ],
    ids=["prepare", "tokenize_mask"],
)
def test_uncached_hub_id_without_the_hub_fails_fast_in_one_line(tmp_path, stage, param, hub_id, subject, no_hub):
    changes, why = NO_HUB[no_hub]
    root = stage_project(tmp_path / "project")
    set_params(root, **{param: hub_id})
    started = time.monotonic()
    proc = fails_cleanly(root, stage, subject + why, "is not in the local cache", f"-S {param}=path/to/folder",
                         env={**changes, **hf_home(tmp_path / "hf")})
    assert time.monotonic() - started < 20  # imports included; it was 25 s (prepare) and 50 s (tokenize_mask)
    assert_no_retries(proc.stderr)
    assert_fixes_work_for_any_command(error_line(proc))


@pytest.mark.parametrize("no_hub", NO_HUB)
def test_model_loader_fails_fast_without_the_hub(monkeypatch, no_hub):
    from huggingface_hub import constants

    from samsum_qlora.model.loading import choose_device, load_base_model, load_tokenizer
    from samsum_qlora.params import ModelParams, QuantizationParams

    changes, why = NO_HUB[no_hub]
    for name, value in changes.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    # huggingface_hub reads these once, when imported: give it what it would have read now.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", no_hub == "offline-mode")
    monkeypatch.setattr(constants, "ENDPOINT", changes.get("HF_ENDPOINT", constants.ENDPOINT))
    model = ModelParams(base_model="nobody/no-such-chat-model", tokenizer_type=None)
    quant = QuantizationParams(use_4bit=False)
    for load in (lambda: load_tokenizer(model), lambda: load_base_model(model, quant, choose_device(quant))):
        started = time.monotonic()
        with pytest.raises(PipelineError) as err:
            load()
        assert time.monotonic() - started < 10  # imports on first use included; retrying took 23 s or more
        message = str(err.value)
        assert "\n" not in message
        assert message.startswith("could not load model.base_model 'nobody/no-such-chat-model' from the Hugging Face "
                                  f"hub: {why}"), message
        assert "-S model.base_model=path/to/folder" in message
        assert_fixes_work_for_any_command(message)


@pytest.mark.slow
@pytest.mark.parametrize("no_hub", NO_HUB)
def test_hub_model_in_the_local_cache_is_used_without_the_hub(tmp_path, no_hub):
    changes, why = NO_HUB[no_hub]
    cache_as_download(TINY_MODEL, "someone/tiny-chat", tmp_path / "hf" / "hub")
    root = stage_project(tmp_path / "project")
    set_params(root, **{"model.base_model": "someone/tiny-chat"})
    for stage in (("stages.tokenize_mask",), ("stages.evaluate", "baseline")):
        proc = run(root, *stage, env={**changes, **hf_home(tmp_path / "hf")})
        assert proc.returncode == 0, proc.stderr[-3000:]
        said = [line for line in proc.stderr.splitlines()
                if line.endswith(": looking for model.base_model 'someone/tiny-chat' in the local cache")]
        assert said and all(why in line for line in said), proc.stderr[-3000:]  # one per tokenizer/model loaded
        assert_no_retries(proc.stderr)
    assert json.loads((root / "metrics" / "tokens.json").read_text()) != {"earlier": "tokenize_mask"}
    assert json.loads((root / "metrics" / "baseline.json").read_text())["examples"] == 2


@pytest.fixture
def local_hub() -> Iterator[Any]:
    """Start a stand-in for the hub on this machine that answers every request with one status; yields its URL."""
    servers = []

    def start(status: int) -> str:
        class Answer(http.server.BaseHTTPRequestHandler):
            def do_HEAD(self) -> None:  # the name http.server calls
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_HEAD

            def log_message(self, *args: Any) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_hub_check_tells_an_answering_hub_from_a_failing_one(local_hub, monkeypatch):
    from huggingface_hub import constants

    from samsum_qlora import hub

    for name in NO_OFFLINE_MODE:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", local_hub(404))
    assert hub.hub_unavailable() is None  # it answers: ids are looked up there, and a wrong one reported as such
    failing = local_hub(503)
    monkeypatch.setattr(constants, "ENDPOINT", failing)
    assert hub.hub_unavailable() == f"the hub is unreachable at {failing} (HTTP 503)"
    monkeypatch.setattr(constants, "ENDPOINT", CLOSED_PORT)
    started = time.monotonic()
    assert hub.hub_unavailable().startswith(f"the hub is unreachable at {CLOSED_PORT} (ConnectError: ")
    assert time.monotonic() - started < 5
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert hub.hub_unavailable(hub.DATASET_SWITCHES) == "offline mode is set (HF_DATASETS_OFFLINE=1)"


@pytest.mark.parametrize(
    ("stage", "param", "hub_id", "fragments"),
    [
        (("stages.prepare",), "data.source", "nobody/no-such-dialogues",
         ("could not load hub dataset 'nobody/no-such-dialogues' at revision 'main' (",
          "data.source is not an existing local path either", "-S data.source=path/to/folder")),
        (("stages.tokenize_mask",), "model.base_model", "nobody/no-such-chat-model",
         ("could not load model.base_model 'nobody/no-such-chat-model' from the Hugging Face hub (",
          "no local folder of that name exists", "check the id and model.revision", "hf auth login")),
    ],
    ids=["prepare", "tokenize_mask"],
)
def test_unknown_id_on_a_reachable_hub_keeps_its_message(tmp_path, local_hub, stage, param, hub_id, fragments):
    root = stage_project(tmp_path / "project")
    set_params(root, **{param: hub_id})
    env = {**NO_OFFLINE_MODE, **hf_home(tmp_path / "hf"), "HF_ENDPOINT": local_hub(404)}
    proc = fails_cleanly(root, stage, *fragments, env=env)
    assert "offline.run" not in error_line(proc)


# --- environment ----------------------------------------------------------------------------------------------


def test_cuda_only_settings_fall_back_on_cpu_with_a_reason(monkeypatch):
    import torch

    from samsum_qlora.model.loading import choose_device
    from samsum_qlora.params import QuantizationParams

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
    from samsum_qlora.evaluation.generation import _decode

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
    from samsum_qlora.evaluation.generation import Generation, summarize_generations
    from samsum_qlora.evaluation.scoring import ROUGE_KEYS

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
