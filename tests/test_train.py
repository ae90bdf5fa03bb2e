import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from conftest import TINY_MODEL, offline_params
from stages.errors import PipelineError
from stages.params import parse_params
from stages.train import RUN_FINGERPRINT, check_target_modules, checkpoint_to_resume, checkpointing_on, run_fingerprint

ROOT = Path(__file__).resolve().parents[1]


def test_unknown_target_modules_list_the_ones_the_model_has():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL)
    check_target_modules(model, ["q_proj", "v_proj"])
    with pytest.raises(PipelineError) as err:
        check_target_modules(model, ["q_proj", "query"])
    message = str(err.value)
    assert "lora.target_modules names ['query']" in message
    for name in ("down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"):
        assert name in message


def test_fingerprint_follows_training_params_and_data(tmp_path):
    data = tmp_path / "tokenized"
    data.mkdir()
    (data / "a.arrow").write_bytes(b"1234")
    params = parse_params({})
    base = run_fingerprint(params, data)
    assert run_fingerprint(params, data) == base
    assert run_fingerprint(replace(params, lora=replace(params.lora, r=16)), data) != base
    assert run_fingerprint(replace(params, seed=1), data) != base
    # Evaluation params don't touch the checkpoints.
    assert run_fingerprint(replace(params, eval=replace(params.eval, batch_size=1)), data) == base
    (data / "a.arrow").write_bytes(b"1235")
    assert run_fingerprint(params, data) != base


def test_checkpoints_are_resumed_only_for_the_same_fingerprint(tmp_path):
    folder = tmp_path / "checkpoints"
    assert checkpoint_to_resume("aaa", folder) is None  # nothing yet: start, and mark the folder
    assert json.loads((folder / RUN_FINGERPRINT).read_text()) == {"fingerprint": "aaa"}
    for step in (2, 4):
        (folder / f"checkpoint-{step}").mkdir()
        (folder / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert checkpoint_to_resume("aaa", folder) == str(folder / "checkpoint-4")
    # The last checkpoint of a finished run is not resumed: a forced re-run trains anew.
    (folder / "checkpoint-4" / "trainer_state.json").write_text('{"global_step": 4, "max_steps": 4}')
    assert checkpoint_to_resume("aaa", folder) is None and not (folder / "checkpoint-2").exists()
    for step in (2, 4):
        (folder / f"checkpoint-{step}").mkdir()
        state = {"global_step": step, "max_steps": 8}
        (folder / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps(state))
    assert checkpoint_to_resume("aaa", folder) == str(folder / "checkpoint-4")
    assert checkpoint_to_resume("bbb", folder) is None  # other params: cleared, start clean
    assert not (folder / "checkpoint-4").exists()
    assert json.loads((folder / RUN_FINGERPRINT).read_text()) == {"fingerprint": "bbb"}


def run_stage(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_resuming_from_a_checkpoint_continues_the_same_run(tmp_path):
    params = offline_params(
        model={"base_model": str(TINY_MODEL)},
        data={"train_samples": 48, "validation_samples": 8, "test_samples": 4},
        training={"max_steps": 6, "save_steps": 3, "eval_steps": 3, "logging_steps": 1,
                  "per_device_train_batch_size": 4, "save_total_limit": 5},
    )
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "samples").symlink_to(ROOT / "data" / "samples")
    run_stage(tmp_path, "stages.prepare")
    run_stage(tmp_path, "stages.tokenize_mask")

    run_stage(tmp_path, "stages.train")
    whole = json.loads((tmp_path / "metrics/train.json").read_text())
    assert whole["steps"] == 6 and whole["resumed_from_step"] == 0
    # The offline profile: padded batches under SDPA, the 4-bit base unpacked, nothing compiled on CPU.
    assert (whole["attention"], whole["dequantized"], whole["compiled"], whole["upcast_frozen"]) == (
        "sdpa", True, False, False)
    losses = [e["loss"] for e in json.loads(
        (tmp_path / "models/checkpoints/checkpoint-6/trainer_state.json").read_text())["log_history"] if "loss" in e]

    # As if the run had been killed after step 3: the later checkpoint and the adapter never got written.
    import shutil

    shutil.rmtree(tmp_path / "models/checkpoints/checkpoint-6")
    shutil.rmtree(tmp_path / "models/adapter")
    run_stage(tmp_path, "stages.train")
    resumed = json.loads((tmp_path / "metrics/train.json").read_text())
    assert resumed["resumed_from_step"] == 3 and resumed["steps"] == 6
    history = json.loads((tmp_path / "models/checkpoints/checkpoint-6/trainer_state.json").read_text())["log_history"]
    resumed_losses = [e["loss"] for e in history if "loss" in e]
    assert resumed_losses == pytest.approx(losses, rel=1e-3)
    assert resumed["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-3)
    assert (tmp_path / "models/adapter/adapter_model.safetensors").is_file()

    # Another seed is another run: it starts clean (its checkpoints are not ours) and learns differently.
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({**params, "seed": 7}))
    run_stage(tmp_path, "stages.train")
    other = json.loads((tmp_path / "metrics/train.json").read_text())
    assert other["resumed_from_step"] == 0 and other["steps"] == 6
    assert other["train_loss"] != pytest.approx(whole["train_loss"], rel=1e-4)


def _training_params(**training):
    return parse_params(offline_params(model={"base_model": str(TINY_MODEL)}, training=training))


def _loss(model, batch: dict) -> float:
    import torch

    with torch.no_grad():
        return model(**batch).loss.item()


def test_dequantized_base_computes_what_the_4bit_kernels_compute(tiny_tokenizer):
    """training.dequantize swaps bitsandbytes' 4-bit layers for plain ones holding the same unpacked values."""
    from bitsandbytes.nn import Linear4bit

    from stages.modeling import choose_device, load_base_model
    from stages.train import prepare_base

    batch = tiny_tokenizer(["Anna: Lunch at 1?\nTom: Sure, the Italian place."], return_tensors="pt")
    batch["labels"] = batch["input_ids"].clone()
    losses = {}
    for dequantize in (False, True):
        params = _training_params(dequantize=dequantize, padding_free=False)
        policy = choose_device(params.quantization)
        model = prepare_base(load_base_model(params.model, params.quantization, policy), params, policy)
        four_bit = [m for m in model.modules() if isinstance(m, Linear4bit)]
        assert bool(four_bit) != dequantize
        assert not any(p.requires_grad for p in model.parameters())
        losses[dequantize] = _loss(model, batch)
    assert losses[True] == pytest.approx(losses[False], rel=1e-6)


def test_switches_set_attention_checkpointing_and_float32_frozen_layers():
    import torch
    from transformers import AutoModelForCausalLM

    from stages.modeling import choose_device
    from stages.train import prepare_base

    params = _training_params(padding_free=True, gradient_checkpointing=True, upcast_frozen=True)
    params = replace(params, quantization=replace(params.quantization, use_4bit=False))
    model = prepare_base(AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.bfloat16), params,
                         choose_device(params.quantization))
    assert model.config._attn_implementation == "packed"
    assert checkpointing_on(model)
    assert {p.dtype for p in model.parameters()} == {torch.float32}

    params = _training_params(padding_free=False, gradient_checkpointing=False, upcast_frozen=False)
    params = replace(params, quantization=replace(params.quantization, use_4bit=False))
    model = prepare_base(AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.bfloat16), params,
                         choose_device(params.quantization))
    assert model.config._attn_implementation == "sdpa"
    assert not checkpointing_on(model)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_compile_is_skipped_on_cpu_and_said(caplog):
    import logging

    from transformers import AutoModelForCausalLM

    from stages.modeling import choose_device
    from stages.train import add_lora, decoder_layers

    params = _training_params(compile=True)
    params = replace(params, quantization=replace(params.quantization, use_4bit=False))
    base = AutoModelForCausalLM.from_pretrained(TINY_MODEL)
    with caplog.at_level(logging.INFO, logger="stages.train"):
        model = add_lora(base, params, choose_device(params.quantization))
    assert "training.compile applies on CUDA only" in caplog.text
    layers = decoder_layers(model)
    assert len(layers) == base.config.num_hidden_layers
    assert not any(getattr(layer, "_compiled_call_impl", None) for layer in layers)
