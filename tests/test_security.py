"""Security: no remote code is ever run, the Hugging Face token is never written anywhere, weights are safetensors."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import TINY_MODEL, make_project, offline_params, run_dvc

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("samsum_qlora", "stages", "offline", "benchmarks")
FAKE_TOKEN = "hf_FakeTokenForTests0123456789"
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


def python_files() -> list[Path]:
    return sorted(path for folder in SCANNED for path in (ROOT / folder).rglob("*.py"))


def keyword_values(tree: ast.AST, name: str) -> list[ast.expr]:
    """The values given to keyword `name` in every call, and to key `name` in every dict literal."""
    values = [kw.value for node in ast.walk(tree) if isinstance(node, ast.Call) for kw in node.keywords
              if kw.arg == name]
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            values += [v for k, v in zip(node.keys, node.values, strict=True)
                       if isinstance(k, ast.Constant) and k.value == name]
    return values


def test_source_never_enables_remote_code_or_passes_a_token():
    files = python_files()
    assert ROOT / "samsum_qlora" / "model" / "loading.py" in files  # where the model and tokenizer are loaded
    explicit_false = 0
    for path in files:
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text, filename=str(path))
        for value in keyword_values(tree, "trust_remote_code"):
            where = f"{path.relative_to(ROOT)}:{value.lineno}"
            assert isinstance(value, ast.Constant) and value.value is False, f"trust_remote_code not False at {where}"
            explicit_false += 1
        # The token is read by huggingface_hub itself (HF_TOKEN or `hf auth login`); project code never handles it.
        if {"samsum_qlora", "stages"} & set(path.relative_to(ROOT).parts):
            for name in ("token", "use_auth_token", "hub_token"):
                assert not keyword_values(tree, name), f"{path.relative_to(ROOT)} passes `{name}=`"
    assert explicit_false >= 2  # the tokenizer and model loaders say so explicitly


class Recorder:
    """Wraps a loader, recording the keyword arguments of every call before passing it on."""

    def __init__(self, original: Any) -> None:
        self.original = original
        self.calls: list[dict[str, Any]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(kwargs)
        return self.original(*args, **kwargs)


def test_every_loader_is_called_without_remote_code(tmp_path, monkeypatch):
    import datasets
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from samsum_qlora.data.sources import load_hub
    from samsum_qlora.model.adapter import load_adapter
    from samsum_qlora.model.loading import choose_device, load_base_model, load_tokenizer
    from samsum_qlora.params import ModelParams, QuantizationParams

    adapter = tmp_path / "adapter"
    base = AutoModelForCausalLM.from_pretrained(TINY_MODEL)
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")).save_pretrained(adapter)

    fake_hub = datasets.DatasetDict({split: datasets.Dataset.from_dict({"dialogue": ["A: hi"], "summary": ["Hi."]})
                                     for split in ("train", "validation", "test")})
    recorders = {
        "AutoTokenizer": Recorder(AutoTokenizer.from_pretrained),
        "AutoModelForCausalLM": Recorder(AutoModelForCausalLM.from_pretrained),
        "PeftModel": Recorder(PeftModel.from_pretrained),
        "load_dataset": Recorder(lambda *args, **kwargs: fake_hub),
    }
    for cls in (AutoTokenizer, AutoModelForCausalLM, PeftModel):
        monkeypatch.setattr(cls, "from_pretrained", recorders[cls.__name__])
    monkeypatch.setattr(datasets, "load_dataset", recorders["load_dataset"])

    model = ModelParams(base_model=str(TINY_MODEL), tokenizer_type=None)
    quant = QuantizationParams(use_4bit=False)
    load_tokenizer(model)
    load_adapter(load_base_model(model, quant, choose_device(quant)), str(adapter))
    load_hub("someone/dialogues", "main")

    for name, recorder in recorders.items():
        assert recorder.calls, f"{name} was never called"
        for kwargs in recorder.calls:
            assert kwargs.get("trust_remote_code", False) is False, (name, kwargs)
    for name in ("AutoTokenizer", "AutoModelForCausalLM"):  # these would run a repo's code if asked: say no
        assert all(kwargs["trust_remote_code"] is False for kwargs in recorders[name].calls)


CUSTOM_CODE = """
import pathlib
pathlib.Path({sentinel!r}).write_text("custom code ran")
from transformers import LlamaConfig, PreTrainedTokenizerFast
class CustomConfig(LlamaConfig):
    pass
class CustomTokenizer(PreTrainedTokenizerFast):
    pass
"""


def model_with_custom_code(folder: Path, sentinel: Path) -> Path:
    """The tiny model, with config and tokenizer pointing at a code file that leaves a mark when imported."""
    shutil.copytree(TINY_MODEL, folder)
    (folder / "custom.py").write_text(CUSTOM_CODE.format(sentinel=str(sentinel)))
    for name, auto_map in (("config.json", {"AutoConfig": "custom.CustomConfig",
                                            "AutoModelForCausalLM": "custom.CustomModel"}),
                           ("tokenizer_config.json", {"AutoTokenizer": ["custom.CustomTokenizer", None]})):
        config = json.loads((folder / name).read_text())
        config["auto_map"] = auto_map
        (folder / name).write_text(json.dumps(config))
    return folder


def test_a_model_that_ships_its_own_code_is_loaded_without_running_it(tmp_path):
    from samsum_qlora.model.loading import choose_device, load_base_model, load_tokenizer
    from samsum_qlora.params import ModelParams, QuantizationParams

    sentinel = tmp_path / "custom-code-ran"
    folder = model_with_custom_code(tmp_path / "model", sentinel)
    model = ModelParams(base_model=str(folder), tokenizer_type=None)
    quant = QuantizationParams(use_4bit=False)
    assert load_tokenizer(model).chat_template
    assert load_base_model(model, quant, choose_device(quant)) is not None
    assert not sentinel.exists()

    # The same folder does run its code when remote code is trusted: the check above is a real one.
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    code = ("from transformers import AutoTokenizer; "
            f"AutoTokenizer.from_pretrained({str(folder)!r}, trust_remote_code=True)")
    subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=120)
    assert sentinel.read_text() == "custom code ran"


@pytest.mark.slow
def test_token_is_never_written_and_the_adapter_is_safetensors_only(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    params = offline_params(
        model={"base_model": str(TINY_MODEL)},
        data={"train_samples": 16, "validation_samples": 4, "test_samples": 2},
        training={"max_steps": 2, "save_steps": 2, "eval_steps": 2, "logging_steps": 1},
        eval={"max_samples": 2, "max_new_tokens": 8},
    )
    repo = make_project(tmp_path / "repo", params)
    proc = run_dvc(repo, "repro", "evaluate_adapter")
    assert "Running stage 'evaluate_adapter'" in proc.stdout

    assert FAKE_TOKEN not in proc.stdout and FAKE_TOKEN not in proc.stderr
    written = [path for path in repo.rglob("*") if path.is_file()]
    for expected in ("params.yaml", "dvc.lock", "metrics/adapter.json", "data/predictions/adapter.jsonl",
                     "models/checkpoints/checkpoint-2/training_args.bin"):
        assert repo / expected in written
    leaked = [str(path.relative_to(repo)) for path in written if FAKE_TOKEN.encode() in path.read_bytes()]
    assert leaked == []

    adapter = sorted(path.name for path in (repo / "models" / "adapter").iterdir())
    assert "adapter_model.safetensors" in adapter and "adapter_config.json" in adapter
    assert not [name for name in adapter if Path(name).suffix in PICKLE_SUFFIXES], adapter
