"""The memory budget (samsum_qlora/memory/): estimates against peaks measured on a GPU, the plans it picks, its errors,
and the train and evaluate stages applying it."""

import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from benchmarks.card_plans import shape  # the Llama 3 shapes as the estimates read them
from conftest import TINY_MODEL
from samsum_qlora.errors import PipelineError
from samsum_qlora.memory import budget, estimates
from samsum_qlora.memory.budget import plan_memory
from samsum_qlora.memory.estimates import GIB, Shape, training_bytes
from samsum_qlora.memory.planning import EvalPlan, TrainPlan, plan_generation, plan_training
from samsum_qlora.model.loading import DevicePolicy
from samsum_qlora.params import EvalParams, Params, TrainingParams

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
SAMSUM_LOSS_FRACTION = 0.155  # summary tokens of a SAMSum-length example through the Llama 3 template
# SAMSum through the Llama 3 template, 16 sequences per step: an average step, and the most a step can hold.
MEAN_STEP, LARGEST_STEP, LONGEST = 16 * 296, 16 * 512, 512


def test_shape_counts_the_hub_models_weights():
    # Linear layers + embeddings (+ norms, which the estimates leave out): the published parameter counts.
    for name, published in [("1B", 1_235_814_400), ("8B", 8_030_261_248)]:
        s = shape(name)
        norms = s.layers * 2 * s.hidden + s.hidden
        assert s.linear_weights + s.embedding_weights + norms == published


def _measured_1b() -> list[tuple[str, int, bool, float]]:
    """(case, tokens of the heaviest pass, checkpointing, measured peak GiB) from the memory benchmark (1B shape,
    base unpacked to bf16, compiled layers): typical and heavy steps, a cap of 2560 tokens, checkpointing."""
    memory = json.loads((RESULTS / "memory-nvidia-h200-2026-11-29.json").read_text())
    steps = memory["config"]["step_tokens"]
    typical, heavy = max(steps[:10]), max(steps[10:])
    rows = {r["setting"]: r for r in memory["results"]}
    return [("typical steps", typical, False, rows["cap null"]["peak_gib_typical"]),
            ("heavy steps", heavy, False, rows["cap null"]["peak_gib_heavy"]),
            ("cap 2560", 2560, False, rows["cap 2560"]["peak_gib_heavy"]),
            ("checkpointing, heavy steps", heavy, True, rows["checkpointing, no cap"]["peak_gib_heavy"])]


@pytest.mark.parametrize("case,tokens,checkpointing,measured", _measured_1b(), ids=lambda v: str(v))
def test_estimates_follow_the_1b_peaks_measured_on_a_gpu(case, tokens, checkpointing, measured):
    estimate = training_bytes(shape("1B"), tokens, use_4bit=True, unpacked=True, checkpointing=checkpointing,
                              element=2, loss_fraction=SAMSUM_LOSS_FRACTION) / GIB
    assert measured * 0.97 <= estimate <= measured * 1.05, (case, estimate, measured)


def test_estimate_follows_the_8b_peak_measured_on_a_gpu():
    # 8B shape, 4-bit base, no checkpointing, passes of at most 2048 tokens (every step of that run was longer).
    run = json.loads((RESULTS / "train-nvidia-h200-2026-11-29-8b-4bit-cap2048.json").read_text())
    result = run["results"][0]
    estimate = training_bytes(shape("8B"), 2048, use_4bit=True, unpacked=False, checkpointing=False, element=2,
                              loss_fraction=result["loss_token_fraction"]) / GIB
    assert result["peak_memory_gib"] * 0.97 <= estimate <= result["peak_memory_gib"] * 1.05


@pytest.mark.parametrize("run", ["8b-budget12-per-pass-ab", "8b-budget16-per-pass", "8b-budget22-per-pass"])
def test_estimates_follow_the_8b_peaks_measured_with_checkpointing_per_pass(run):
    # The benchmark's heaviest step (6,832 tokens) ran with the layers its plan gave it checkpointed.
    result = json.loads((RESULTS / f"train-nvidia-h200-2026-11-30-{run}.json").read_text())["results"][0]
    tokens, layers = result["settings"]["memory_plan"]["checkpointed_layers_by_pass_tokens"][-1]
    assert tokens == 6832 and 0 < layers < 32
    unpacked = result["settings"]["memory_plan"]["dequantize"]
    estimate = training_bytes(shape("8B"), tokens, use_4bit=True, unpacked=unpacked, checkpointing=layers, element=2,
                              loss_fraction=result["loss_token_fraction"]) / GIB
    assert result["peak_memory_gib"] * 0.97 <= estimate <= result["peak_memory_gib"] * 1.05, (estimate, result)


def plan(name: str, gib: float, training: TrainingParams | None = None, **kw):
    defaults = dict(use_4bit=True, element=2, lora_r=8, lora_targets=["q_proj", "v_proj"], mean_step_tokens=MEAN_STEP,
                    largest_step_tokens=LARGEST_STEP, longest_example=LONGEST, loss_fraction=SAMSUM_LOSS_FRACTION)
    return plan_training(shape(name), training or TrainingParams(), gib, **{**defaults, **kw})


def test_the_default_1b_job_on_a_large_card_is_left_as_it_is():
    chosen = plan("1B", 139.8)
    as_set = TrainPlan.as_set(TrainingParams())
    assert chosen.changed == () and switches(chosen) == switches(as_set)


def switches(plan: TrainPlan) -> tuple:
    """The training switches a plan sets."""
    return plan.dequantize, plan.gradient_checkpointing, plan.max_tokens_per_micro_batch


PER_PASS = "training.gradient_checkpointing=true (per pass, of the layers the pass needs)"


def test_1b_within_6_gib_checkpoints_and_keeps_the_base_unpacked():
    chosen = plan("1B", 6)
    assert (chosen.dequantize, chosen.gradient_checkpointing) == (True, True)
    assert MEAN_STEP <= chosen.max_tokens_per_micro_batch < LARGEST_STEP and chosen.estimate_gib <= 6
    assert chosen.changed == (PER_PASS,
                              f"training.max_tokens_per_micro_batch={chosen.max_tokens_per_micro_batch} (from 8192)")
    # The cap is what fits with every layer checkpointed; smaller passes checkpoint fewer.
    assert chosen.layers_to_checkpoint(chosen.max_tokens_per_micro_batch) == 16
    assert chosen.layers_to_checkpoint(MEAN_STEP) < 16 and chosen.layers_to_checkpoint(1000) == 0


@pytest.mark.parametrize("gib", [12, 16])
def test_8b_on_small_cards_trains_over_the_4bit_base_with_checkpointing(gib):
    chosen = plan("8B", gib)
    assert (chosen.dequantize, chosen.gradient_checkpointing, chosen.max_tokens_per_micro_batch) == (False, True, 8192)
    assert chosen.estimate_gib <= gib
    assert chosen.changed == ("training.dequantize=false (the 4-bit base)", PER_PASS)


@pytest.mark.parametrize("name,gib", [("1B", 6), ("8B", 12), ("8B", 16), ("8B", 23.6), ("3B", 16)])
def test_each_pass_checkpoints_the_fewest_layers_that_let_it_fit(name, gib):
    chosen, s = plan(name, gib), shape(name)
    fixed = training_bytes(s, 0, use_4bit=True, unpacked=chosen.dequantize, checkpointing=False, element=2,
                           loss_fraction=SAMSUM_LOSS_FRACTION)

    def gib_for(tokens: int, layers: int) -> float:
        return estimates.gib(fixed + tokens * estimates.activation_bytes_per_token(s, 2, layers, SAMSUM_LOSS_FRACTION))

    counts = []
    for tokens in range(LONGEST, chosen.max_tokens_per_micro_batch + 1, 97):
        layers = chosen.layers_to_checkpoint(tokens)
        assert gib_for(tokens, layers) <= gib <= (gib_for(tokens, layers - 1) if layers else gib), (tokens, layers)
        assert gib_for(tokens, layers) <= chosen.estimate_gib + 1e-9
        counts.append(layers)
    assert counts == sorted(counts) and counts[0] < counts[-1] <= s.layers  # more tokens, more layers
    # What the plan records: [most tokens, layers] in increasing size, ending at the cap.
    steps = chosen.describe()["checkpointed_layers_by_pass_tokens"]
    assert steps[-1][0] == min(chosen.max_tokens_per_micro_batch, LARGEST_STEP) and steps == sorted(steps)
    assert all(chosen.layers_to_checkpoint(t) == c for t, c in steps)


def test_checkpointing_by_layers_interpolates_none_and_all():
    s, loss = shape("8B"), SAMSUM_LOSS_FRACTION
    none, every = (estimates.activation_bytes_per_token(s, 2, c, loss) for c in (False, True))
    assert estimates.activation_bytes_per_token(s, 2, 0, loss) == none
    assert estimates.activation_bytes_per_token(s, 2, s.layers, loss) == every
    # Each layer checkpointed keeps its input (hidden x 2 bytes) instead of all it saves (139,264 bytes for 8B).
    layer, hidden = estimates.layer_bytes_per_token(s, 2), s.hidden * 2
    assert layer == (6 * 4096 + 2 * 1024 + 3 * 14336) * 2
    partial = estimates.PARTIAL_BACKWARD_LAYERS * layer  # the backward temporaries of a layer, when some are kept
    assert none - estimates.activation_bytes_per_token(s, 2, 10, loss) == 10 * (layer - hidden) - partial


def test_8b_on_a_24_gib_card_checkpoints_over_the_unpacked_base():
    # 15 GiB of bf16 weights leave room for checkpointed activations: faster than unpacking in every matmul.
    chosen = plan("8B", 23.6)
    assert (chosen.dequantize, chosen.gradient_checkpointing) == (True, True) and chosen.estimate_gib <= 23.6


def test_8b_on_an_80_gib_card_keeps_the_fast_settings():
    assert plan("8B", 80).changed == ()


def test_3b_within_16_gib_lowers_the_cap_while_most_steps_still_run_whole():
    # The benchmark's examples (mean 211 tokens): a cap above the mean step splits only the heaviest steps; the
    # plan the GPU run logged (train-nvidia-h200-2026-11-29-3b-budget16.json).
    run = json.loads((RESULTS / "train-nvidia-h200-2026-11-29-3b-budget16.json").read_text())
    data, measured = run["config"]["data"], run["results"][-1]
    chosen = plan("3B", 16, mean_step_tokens=16 * data["length_mean"], largest_step_tokens=16 * data["length_max"],
                  longest_example=data["length_max"], loss_fraction=data["loss_token_fraction"])
    assert (chosen.dequantize, chosen.gradient_checkpointing) == (False, False)
    assert chosen.max_tokens_per_micro_batch == measured["settings"]["memory_plan"]["max_tokens_per_micro_batch"]
    assert measured["peak_memory_gib"] <= 16
    # SAMSum's own lengths (mean 296): that cap would split most steps, so the plan checkpoints instead.
    assert plan("3B", 16).gradient_checkpointing


def test_a_users_memory_switches_are_never_undone():
    # Checkpointing and the 4-bit base asked for stay, even where the budget would allow more.
    asked = TrainingParams(gradient_checkpointing=True, dequantize=False)
    chosen = plan("1B", 139.8, asked)
    assert (chosen.dequantize, chosen.gradient_checkpointing, chosen.changed) == (False, True, ())
    # Checkpointing asked for covers every layer of every pass, even under a budget that needs it.
    small = plan("8B", 12, asked)
    assert small.pass_limits is None and small.layers_to_checkpoint(8192) is None and small.changed == ()


def test_a_users_small_cap_that_fits_is_kept():
    # Below the mean step (most steps split), but it fits: the user's choice stands.
    chosen = plan("1B", 8, replace(TrainingParams(), max_tokens_per_micro_batch=2048))
    assert (chosen.changed, chosen.max_tokens_per_micro_batch, chosen.gradient_checkpointing) == ((), 2048, False)


def test_an_unreachable_budget_says_what_the_model_needs():
    with pytest.raises(PipelineError) as err:
        plan("8B", 5)
    message = str(err.value)
    assert message.startswith("training.max_memory_gib=5: this model needs about ")
    assert "raise training.max_memory_gib" in message and "\n" not in message


def test_generation_plans():
    ev = EvalParams()
    assert plan_generation(shape("1B"), ev, 139.8, use_4bit=True, element=2, longest_prompt=900).changed == ()
    # The plans the GPU runs logged for prompts of up to 486 tokens (eval-nvidia-h200-2026-11-29-{3b,8b}-budget16).
    eight = plan_generation(shape("8B"), ev, 16, use_4bit=True, element=2, longest_prompt=486)
    assert (eight.dequantize, eight.batch_size) == (False, 64) and eight.estimate_gib <= 16
    three = plan_generation(shape("3B"), ev, 16, use_4bit=True, element=2, longest_prompt=486)
    assert (three.dequantize, three.batch_size) == (True, 64)
    assert plan_generation(shape("1B"), replace(ev, dequantize=False), 139.8, use_4bit=True, element=2,
                           longest_prompt=900).dequantize is False
    with pytest.raises(PipelineError, match=r"^eval.max_memory_gib=3: generating one 900-token prompt needs about"):
        plan_generation(shape("8B"), ev, 3, use_4bit=True, element=2, longest_prompt=900)


CPU = DevicePolicy("cpu", torch.float32, "adamw_torch", False, "test")


def _params(model_dir: Path, **training) -> Params:
    params = Params()
    return replace(params, model=replace(params.model, base_model=str(model_dir), tokenizer_type=None),
                   training=replace(params.training, **training))


def test_train_stage_applies_the_plan_and_says_so(caplog, monkeypatch):
    capped = []
    monkeypatch.setattr(budget, "cap_allocator", lambda gib, device: capped.append((gib, device)))
    rows = Dataset.from_dict({"input_ids": [[1] * n for n in (300, 500, 200)],
                              "labels": [[-100] * (n - 30) + [1] * 30 for n in (300, 500, 200)],
                              "length": [300, 500, 200]})
    params = _params(TINY_MODEL)
    s = Shape.from_config(budget_config(TINY_MODEL))
    # A budget between what checkpointing and what full activations need for the largest step on this model.
    per_token = estimates.activation_bytes_per_token(s, 4, False, 0.1)
    fixed = estimates.base_bytes(s, True, True, 4) + estimates.lora_weights(s, 8, ["q_proj", "v_proj"]) * 16
    gib = estimates.gib(fixed + per_token * 700)
    with caplog.at_level(logging.INFO, logger="samsum_qlora.memory.budget"):
        chosen = plan_memory(replace(params, training=replace(params.training, max_memory_gib=gib)), CPU,
                             train_data=rows)
    assert chosen.max_tokens_per_micro_batch < 1000 or chosen.gradient_checkpointing
    assert chosen.changed and capped == [(gib, "cpu")]
    assert f"memory budget {gib:.1f} GiB (set)" in caplog.text and "would not fit" in caplog.text
    # No budget on CPU: nothing planned, nothing capped.
    assert plan_memory(params, CPU, train_data=rows) == TrainPlan.as_set(params.training) and len(capped) == 1


def test_train_stage_under_a_budget_checkpoints_each_pass_as_it_needs(tmp_path):
    """One example per step over the 4-bit base, a budget that fits the longest example with half the layers
    checkpointed: the stage plans per-pass checkpointing, says so, and records the layers its passes checkpointed."""
    import yaml
    from datasets import load_from_disk
    from test_train import train_figures

    from conftest import run_module, tokenized_project

    params = tokenized_project(tmp_path, per_device_train_batch_size=1)
    s = Shape.from_config(budget_config(TINY_MODEL))
    train_rows = load_from_disk(str(tmp_path / "data" / "tokenized"))["train"]
    labels = [label for row in train_rows["labels"] for label in row]
    loss_fraction = sum(label != -100 for label in labels) / len(labels)
    lengths = sorted(train_rows["length"])
    lora = estimates.lora_weights(s, params["lora"]["r"], params["lora"]["target_modules"]) * estimates.LORA_STATE_BYTES
    fixed = estimates.base_bytes(s, True, False, 4) + lora  # the 4-bit base, as set below
    gib = estimates.gib(fixed + lengths[-1] * estimates.activation_bytes_per_token(s, 4, s.layers // 2, loss_fraction))
    gib += 1e-6  # ~1 KB: the longest example fits exactly, not one byte short of float rounding
    params["training"].update(max_memory_gib=gib, dequantize=False)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    logged = run_module(tmp_path, "stages.train").stderr
    facts = train_figures(tmp_path)
    # The run record keeps the switches as params.yaml sets them; the plan's choice is under memory_plan.
    assert PER_PASS in facts["memory_plan"]["changed"] and facts["memory_plan"]["gradient_checkpointing"]
    assert facts["gradient_checkpointing"] is False and facts["memory_plan"]["dequantize"] is False
    steps = facts["memory_plan"]["checkpointed_layers_by_pass_tokens"]
    assert steps[-1] == [lengths[-1], s.layers // 2]  # the longest example fits with half the layers checkpointed
    assert 0 < facts["checkpointed_layers_per_pass"] < s.layers // 2 + 1 and facts["micro_batches"] == 6
    assert "decoder layers on average over 6 passes" in logged and "per pass, of the layers" in logged
    first_tokens, first_layers = steps[0]
    assert (f"checkpointing per pass: {first_layers} of {s.layers} decoder layers for passes of up to "
            f"{first_tokens:,} tokens, ..., {s.layers // 2} for the largest ({lengths[-1]:,} tokens)") in logged


def test_a_plan_that_changes_settings_or_holds_a_budget_asks_for_expandable_segments(monkeypatch):
    asked = []
    monkeypatch.setattr(budget, "cap_allocator", lambda gib, device: asked.append(("cap", gib)))
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", asked.append, raising=False)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    planned, as_set = plan("8B", 16), plan("8B", 80)
    budget.adopt(planned, "the GPU's memory", None, "cuda")
    assert asked == ["expandable_segments:True"]
    budget.adopt(as_set, "the GPU's memory", None, "cuda")  # nothing changed, no budget set
    assert asked == ["expandable_segments:True"]
    budget.adopt(as_set, "set", 80, "cuda")
    assert asked[1:] == ["expandable_segments:True", ("cap", 80)]
    budget.adopt(planned, "set", 16, "cpu")  # no CUDA allocator to set
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:False")  # the user's choice stands
    budget.adopt(planned, "the GPU's memory", None, "cuda")
    assert asked[3:] == [("cap", 16)]


def test_evaluate_stage_applies_the_plan(monkeypatch):
    monkeypatch.setattr(budget, "cap_allocator", lambda gib, device: None)
    params = _params(TINY_MODEL)
    s = Shape.from_config(budget_config(TINY_MODEL))
    room = estimates.base_bytes(s, True, True, 4) + estimates.generation_bytes(s, 20, 200, 64, 4)
    small = replace(params, eval=replace(params.eval, max_memory_gib=estimates.gib(room)))
    planned = plan_memory(small, CPU, longest_prompt=200)
    assert planned.batch_size == 16 and planned.dequantize
    assert plan_memory(params, CPU, longest_prompt=200) == EvalPlan.as_set(params.eval)


def budget_config(model_dir: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir)
