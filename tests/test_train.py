import json
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from conftest import TINY_MODEL, complete_checkpoint, offline_params, run_module, stage_error_line, tokenized_project
from samsum_qlora.errors import PipelineError
from samsum_qlora.model.lora import check_target_modules, checkpointing_on
from samsum_qlora.params import parse_params
from samsum_qlora.training.checkpoints import (
    RUN_FINGERPRINT,
    SPEED_AND_MEMORY_SWITCHES,
    checkpoint_to_resume,
    run_fingerprint,
)

ROOT = Path(__file__).resolve().parents[1]



def train_figures(root) -> dict:
    """Everything the train stage reported: the metrics (train.json) and the run's facts (train_run.json)."""
    return {**json.loads((root / "metrics/train.json").read_text()),
            **json.loads((root / "metrics/train_run.json").read_text())}

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
    assert run_fingerprint(replace(params, training=replace(params.training, learning_rate=1e-3)), data) != base
    # Evaluation params don't touch the checkpoints, and neither do the switches that change only speed or memory:
    # a run stopped for lack of memory resumes after one of them is changed.
    assert run_fingerprint(replace(params, eval=replace(params.eval, batch_size=1)), data) == base
    faster_or_smaller = {"max_tokens_per_micro_batch": 512, "gradient_checkpointing": True, "compile": False,
                         "dequantize": False, "padding_free": False, "per_device_eval_batch_size": 1,
                         "num_processes": 2, "max_memory_gib": 8}
    assert set(faster_or_smaller) == set(SPEED_AND_MEMORY_SWITCHES)
    for switch, value in faster_or_smaller.items():
        assert getattr(params.training, switch) != value
        assert run_fingerprint(replace(params, training=replace(params.training, **{switch: value})), data) == base
    (data / "a.arrow").write_bytes(b"1235")
    assert run_fingerprint(params, data) != base


def test_checkpoints_are_resumed_only_for_the_same_fingerprint(tmp_path):
    folder = tmp_path / "checkpoints"
    assert checkpoint_to_resume("aaa", folder) is None  # nothing yet: start, and mark the folder
    assert json.loads((folder / RUN_FINGERPRINT).read_text()) == {"fingerprint": "aaa"}
    for step in (2, 4):
        complete_checkpoint(folder / f"checkpoint-{step}")
    assert checkpoint_to_resume("aaa", folder) == str(folder / "checkpoint-4")
    # The last checkpoint of a finished run is not resumed: a forced re-run trains anew.
    (folder / "checkpoint-4" / "trainer_state.json").write_text('{"global_step": 4, "max_steps": 4}')
    assert checkpoint_to_resume("aaa", folder) is None and not (folder / "checkpoint-2").exists()
    for step in (2, 4):
        complete_checkpoint(folder / f"checkpoint-{step}", {"global_step": step, "max_steps": 8})
    assert checkpoint_to_resume("aaa", folder) == str(folder / "checkpoint-4")
    assert checkpoint_to_resume("bbb", folder) is None  # other params: cleared, start clean
    assert not (folder / "checkpoint-4").exists()
    assert json.loads((folder / RUN_FINGERPRINT).read_text()) == {"fingerprint": "bbb"}


@pytest.mark.slow
def test_resuming_from_a_checkpoint_continues_the_same_run(tmp_path):
    params = tokenized_project(tmp_path)
    run_module(tmp_path, "stages.train")
    whole = train_figures(tmp_path)
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
    run_module(tmp_path, "stages.train")
    resumed = train_figures(tmp_path)
    assert resumed["resumed_from_step"] == 3 and resumed["steps"] == 6
    history = json.loads((tmp_path / "models/checkpoints/checkpoint-6/trainer_state.json").read_text())["log_history"]
    resumed_losses = [e["loss"] for e in history if "loss" in e]
    assert resumed_losses == pytest.approx(losses, rel=1e-3)
    assert resumed["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-3)
    assert (tmp_path / "models/adapter/adapter_model.safetensors").is_file()

    # Another seed is another run: it starts clean (its checkpoints are not ours) and learns differently.
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({**params, "seed": 7}))
    run_module(tmp_path, "stages.train")
    other = train_figures(tmp_path)
    assert other["resumed_from_step"] == 0 and other["steps"] == 6
    assert other["train_loss"] != pytest.approx(whole["train_loss"], rel=1e-4)


@pytest.mark.slow
def test_out_of_memory_stops_with_one_line_and_a_lower_cap_resumes_the_run(tmp_path, monkeypatch, capsys):
    """A pass that runs out of memory at step 5 stops the stage with one error line naming the switches; the
    checkpoints stay, and after the cap is lowered the next run resumes from step 4 and ends where a run that never
    ran short ends (without dropout, whose draws would differ with the passes)."""
    import re
    import shutil

    import torch
    from transformers import Trainer

    from stages import train

    params = tokenized_project(tmp_path, save_steps=2, max_tokens_per_micro_batch=1024)
    params["lora"]["lora_dropout"] = 0.0
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    run_module(tmp_path, "stages.train")
    whole = train_figures(tmp_path)
    assert (whole["steps"], whole["micro_batches"], whole["max_tokens_per_micro_batch"]) == (6, 6, 1024)
    shutil.rmtree(tmp_path / "models/adapter")
    (tmp_path / "metrics/train.json").unlink()

    original = Trainer.training_step

    def short_of_memory(self, model, inputs, num_items_in_batch=None):
        if self.state.global_step == 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB. GPU 0 has ...")
        return original(self, model, inputs, num_items_in_batch)

    monkeypatch.setattr(Trainer, "training_step", short_of_memory)
    monkeypatch.chdir(tmp_path)
    message = stage_error_line(capsys, train.main)
    shape = (r"error: CUDA ran out of memory at step 5 in a pass of (?P<n>[\d,]+) tokens \(peak [\d.]+ GiB, 1\.50 GiB "
             r"more wanted\); lower training\.max_tokens_per_micro_batch below (?P=n) \(now 1024\), or set "
             r"training\.gradient_checkpointing=true; the last checkpoint models/checkpoints/checkpoint-4 is kept and "
             r"`dvc repro` resumes from it")
    assert re.fullmatch(shape, message), message
    assert sorted(p.name for p in (tmp_path / "models/checkpoints").iterdir()) == [
        "checkpoint-2", "checkpoint-4", RUN_FINGERPRINT]
    assert not (tmp_path / "metrics/train.json").exists() and not (tmp_path / "models/adapter").exists()
    monkeypatch.undo()

    # Two padded rows of the tiny profile fit under 256 tokens, four don't: each step now takes several passes.
    params["training"]["max_tokens_per_micro_batch"] = 256
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    run_module(tmp_path, "stages.train")
    resumed = train_figures(tmp_path)
    assert (resumed["resumed_from_step"], resumed["steps"], resumed["max_tokens_per_micro_batch"]) == (4, 6, 256)
    assert resumed["micro_batches"] >= 4
    assert resumed["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-4)
    assert resumed["eval_loss"] == pytest.approx(whole["eval_loss"], rel=1e-4)


def _training_params(**training):
    return parse_params(offline_params(model={"base_model": str(TINY_MODEL)}, training=training))


def _loss(model, batch: dict) -> float:
    """The loss as training computes it. In train mode bitsandbytes keeps its float32 4-bit path; in eval mode
    under no_grad, CPUs with AVX-512 BF16 switch to a bf16 kernel, which no float32 path would match."""
    import torch

    model.train()
    with torch.no_grad():
        return model(**batch).loss.item()


def test_dequantized_base_computes_what_the_4bit_kernels_compute(tiny_tokenizer):
    """training.dequantize swaps bitsandbytes' 4-bit layers for plain ones holding the same unpacked values."""
    from bitsandbytes.nn import Linear4bit

    from samsum_qlora.model.loading import choose_device, load_base_model
    from samsum_qlora.model.lora import prepare_base

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

    from samsum_qlora.model.loading import choose_device
    from samsum_qlora.model.lora import prepare_base

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

    from samsum_qlora.model.compiling import decoder_layers
    from samsum_qlora.model.loading import choose_device
    from samsum_qlora.model.lora import add_lora

    params = _training_params(compile=True)
    params = replace(params, quantization=replace(params.quantization, use_4bit=False))
    base = AutoModelForCausalLM.from_pretrained(TINY_MODEL)
    with caplog.at_level(logging.INFO, logger="samsum_qlora.model.lora"):
        model = add_lora(base, params, choose_device(params.quantization))
    assert "training.compile applies on CUDA only" in caplog.text
    layers = decoder_layers(model)
    assert len(layers) == base.config.num_hidden_layers
    assert not any(getattr(layer, "_compiled_call_impl", None) for layer in layers)
