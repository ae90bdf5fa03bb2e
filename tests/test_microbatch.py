"""training.max_tokens_per_micro_batch: a step split into passes of at most that many tokens trains exactly as the
step in one pass (the same loss, gradients and update up to float rounding), for both batch layouts; and running
out of memory is reported as one line naming the switches that lower it."""

import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT, TINY_MODEL, complete_checkpoint, offline_params
from samsum_qlora.data.prompt import IGNORE_INDEX, build_example
from samsum_qlora.errors import PipelineError
from samsum_qlora.params import parse_params
from samsum_qlora.training.batching import FlatCollator, PadCollator, group_examples, split_batch
from samsum_qlora.training.microbatch import out_of_memory_error
from samsum_qlora.training.objective import loss_token_count

COLLATORS = {"padded": PadCollator(pad_token_id=0), "padding-free": FlatCollator()}


def synthetic(lengths: list[int]) -> list[dict]:
    """Examples of these lengths whose second half is the summary."""
    features, token = [], 1
    for n in lengths:
        ids = list(range(token, token + n))
        token += n
        features.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (n // 2) + ids[n // 2:]})
    return features


def tokens(piece: dict) -> int:
    return piece["input_ids"].numel()  # a flat row's length, or rows x padded length


def assert_same_batch(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(got[key], value), key
        else:
            assert got[key] == value, key


@pytest.mark.parametrize("layout", COLLATORS)
def test_pieces_are_what_the_collator_makes_of_each_group_and_fit_the_cap(layout):
    collator = COLLATORS[layout]
    features = synthetic([5, 9, 3, 12, 4, 7, 6])
    batch = collator(features)
    pieces = split_batch(batch, max_tokens=16)
    # Greedy, in order: padded, a group costs its rows x its longest row.
    assert [tokens(p) for p in pieces] == ([14, 15, 11, 6] if layout == "padding-free" else [5, 9, 3, 12, 14, 6])
    # Consecutive examples, each once, laid out exactly as the collator lays out that group on its own.
    start = 0
    for piece in pieces:
        rows = piece["input_ids"].shape[0] if layout == "padded" else len(piece["cu_seq_lens_q"]) - 1
        assert_same_batch(piece, collator(features[start:start + rows]))
        start += rows
    assert start == len(features)
    # The loss tokens of the pieces are the step's, so each piece divided by the step's count sums to its mean.
    assert sum(int(loss_token_count(p["labels"])) for p in pieces) == int(loss_token_count(batch["labels"]))


@pytest.mark.parametrize("layout", COLLATORS)
def test_an_example_longer_than_the_cap_runs_alone_and_a_batch_that_fits_is_left_whole(layout):
    collator = COLLATORS[layout]
    features = synthetic([4, 30, 5, 6])
    pieces = split_batch(collator(features), max_tokens=12)
    assert [tokens(p) for p in pieces] == ([4, 30, 11] if layout == "padding-free" else [4, 30, 12])
    batch = collator(features)
    (whole,) = split_batch(batch, max_tokens=10_000)
    assert whole is batch


@pytest.mark.parametrize("value", [0, -4, 2.5, "4k", True])
def test_the_cap_must_be_a_positive_integer_or_null(value):
    with pytest.raises(PipelineError, match=r"params\.yaml: training\.max_tokens_per_micro_batch is "):
        parse_params({"training": {"max_tokens_per_micro_batch": value}})
    assert parse_params({"training": {"max_tokens_per_micro_batch": None}}).training.max_tokens_per_micro_batch is None
    assert parse_params({"training": {"max_tokens_per_micro_batch": 512}}).training.max_tokens_per_micro_batch == 512


@pytest.fixture(scope="module")
def dataset(tiny_tokenizer):
    from datasets import Dataset

    rows = json.loads((ROOT / "data" / "samples" / "train.json").read_text())[:8]
    examples = [build_example(tiny_tokenizer, "Summarize this dialogue.", r["dialogue"], r["summary"], 384,
                              "26 Jul 2024") for r in rows]
    return Dataset.from_dict({"input_ids": [e.input_ids for e in examples], "labels": [e.labels for e in examples]})


def one_step_trainer(padding_free: bool, cap: int | None, dataset, tokenizer, tmp_path, validation=None,
                     eval_batch: int = 8, plan=None):
    """The train stage's Trainer for one optimizer step of 8 sequences over a float32 base (no 4-bit kernels, which
    compute in bf16 on some CPUs) and no dropout, so the two runs compared draw nothing at random."""
    from samsum_qlora.model.loading import choose_device, load_base_model
    from samsum_qlora.model.lora import add_lora
    from samsum_qlora.training.trainer import build_trainer

    params = parse_params(offline_params(
        model={"base_model": str(TINY_MODEL)}, quantization={"use_4bit": False}, lora={"lora_dropout": 0.0},
        training={"max_steps": 1, "logging_steps": 1, "save_strategy": "no", "per_device_train_batch_size": 8,
                  "warmup_steps": 0, "padding_free": padding_free, "max_tokens_per_micro_batch": cap,
                  "per_device_eval_batch_size": eval_batch, "gradient_checkpointing": plan is not None}))
    policy = choose_device(params.quantization)
    torch.manual_seed(0)  # the same LoRA initialisation in every trainer
    model = add_lora(load_base_model(params.model, params.quantization, policy), params, policy)
    return build_trainer(params, policy, model, tokenizer, dataset, validation, [], output_dir=str(tmp_path / "out"),
                         plan=plan)


def lora_tensors(model, grad: bool = False) -> dict[str, torch.Tensor]:
    return {n: (p.grad if grad else p).detach().clone() for n, p in model.named_parameters() if p.requires_grad}


CAP = 300  # the 8 examples hold ~770 tokens: 3 passes padding-free, 4 padded


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding-free"])
def test_a_split_step_has_the_loss_gradients_and_update_of_one_pass(padding_free, dataset, tiny_tokenizer, tmp_path):
    runs = {}
    for cap in (None, CAP):
        trainer = one_step_trainer(padding_free, cap, dataset, tiny_tokenizer, tmp_path)
        # The gradients of the step's micro-batch, as training_step leaves them.
        batch = trainer.data_collator([dataset[i] for i in range(len(dataset))])
        count = loss_token_count(batch["labels"])
        step_loss = trainer.training_step(trainer.model, batch, num_items_in_batch=count)
        grads = lora_tensors(trainer.model, grad=True)
        passes = trainer.passes
        trainer.model.zero_grad()
        # The whole step through Trainer.train: logged loss, gradient norm and the updated LoRA weights.
        trainer.train()
        (log,) = [e for e in trainer.state.log_history if "loss" in e]
        runs[cap] = {"step_loss": step_loss.item(), "grads": grads, "passes": passes, "loss": log["loss"],
                     "grad_norm": log["grad_norm"], "weights": lora_tensors(trainer.model)}
    whole, split = runs[None], runs[CAP]
    assert whole["passes"] == 1 and 2 <= split["passes"] <= 4
    assert split["step_loss"] == pytest.approx(whole["step_loss"], rel=1e-6)
    assert split["loss"] == pytest.approx(whole["loss"], rel=1e-6)
    assert split["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-5)
    assert any(g.abs().sum() > 0 for g in whole["grads"].values())
    for name, grad in whole["grads"].items():
        # float32: the pieces add the same terms in another order, which moves a sum by ~1e-7 of its largest term.
        scale = grad.abs().max().item()
        torch.testing.assert_close(split["grads"][name], grad, rtol=1e-5, atol=1e-5 * scale, msg=name)
    # Adam's first step moves each weight by ~lr (0.002): 1e-5 is half a percent of that.
    for name, weight in whole["weights"].items():
        torch.testing.assert_close(split["weights"][name], weight, rtol=0, atol=1e-5, msg=name)


def test_checkpointing_per_pass_covers_the_layers_each_pass_needs_and_leaves_the_gradients(dataset, tiny_tokenizer,
                                                                                            tmp_path):
    from samsum_qlora.memory.planning import TrainPlan
    from samsum_qlora.model.compiling import decoder_layers

    whole = one_step_trainer(True, None, dataset, tiny_tokenizer, tmp_path)
    batch = whole.data_collator([dataset[i] for i in range(len(dataset))])
    count = loss_token_count(batch["labels"])
    expected_loss = whole.training_step(whole.model, batch, num_items_in_batch=count).item()
    expected = lora_tensors(whole.model, grad=True)

    sizes = sorted(tokens(p) for p in split_batch(batch, CAP))
    assert len(set(sizes)) == 3  # three passes of different sizes: none, one and three layers checkpointed
    limits = (sizes[0], sizes[1], sizes[1], sizes[2], sizes[2], sizes[2], sizes[2])
    plan = TrainPlan(True, True, CAP, 1.0, 1.0, (), pass_limits=limits)
    trainer = one_step_trainer(True, CAP, dataset, tiny_tokenizer, tmp_path, plan=plan)
    layers = decoder_layers(trainer.model)
    assert len(layers) == len(limits) - 1
    recomputed = []  # (tokens of the pass, layer) for every checkpointed forward

    def counting(index, checkpoint):
        def run(*args, **kwargs):
            recomputed.append((trainer.running_pass, index))
            return checkpoint(*args, **kwargs)
        return run

    for i, layer in enumerate(layers):
        layer._gradient_checkpointing_func = counting(i, layer._gradient_checkpointing_func)
    loss = trainer.training_step(trainer.model, batch, num_items_in_batch=count).item()
    # Each pass checkpointed its first k layers, k the fewest whose limit holds its tokens.
    assert sorted(recomputed) == [(sizes[1], 0), (sizes[2], 0), (sizes[2], 1), (sizes[2], 2)]
    assert trainer.passes == 3 and trainer.checkpointed_layers == 0 + 1 + 3
    assert loss == pytest.approx(expected_loss, rel=1e-6)
    for name, grad in expected.items():
        scale = grad.abs().max().item()
        torch.testing.assert_close(lora_tensors(trainer.model, grad=True)[name], grad, rtol=1e-5, atol=1e-5 * scale,
                                   msg=name)


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding-free"])
def test_the_validation_loss_is_the_mean_over_summary_tokens_however_it_is_batched(padding_free, dataset,
                                                                                    tiny_tokenizer, tmp_path):
    """Validation passes hold whole examples up to the token cap (or per_device_eval_batch_size without one), are
    collated once and reused; the loss is the mean over every summary token of the split, computed by hand here
    one example at a time."""
    from samsum_qlora.training.objective import summary_loss

    trainer = one_step_trainer(padding_free, None, dataset, tiny_tokenizer, tmp_path)
    model = trainer.model.eval()
    summed, counted = 0.0, 0
    with torch.no_grad():
        for i in range(len(dataset)):
            batch = trainer.data_collator([dataset[i]])
            outputs = model(**{k: v for k, v in batch.items() if k != "labels"})
            summed += summary_loss(outputs, batch["labels"], num_items_in_batch=1).item()
            counted += int(loss_token_count(batch["labels"]))
    expected = summed / counted
    lengths = [len(ids) for ids in dataset["input_ids"]]
    eval_cap = 260  # 3 passes padding-free, 4 padded (rows x longest row)
    for cap, eval_batch, passes in ((None, 3, 3), (eval_cap, 8, None), (1, 8, len(dataset))):
        trainer = one_step_trainer(padding_free, cap, dataset, tiny_tokenizer, tmp_path, validation=dataset,
                                   eval_batch=eval_batch)
        calls = []

        class Counting(type(trainer.data_collator)):
            def __call__(self, features, calls=calls):
                calls.append(len(features))
                return super().__call__(features)

        trainer.data_collator = Counting(**vars(trainer.data_collator))
        first = trainer.evaluate()["eval_loss"]
        assert first == pytest.approx(expected, rel=1e-5), (cap, eval_batch)
        assert sum(calls) == len(dataset)  # each example collated once
        if passes is not None:
            assert len(trainer._passes) == passes
        else:  # whole examples, greedily, up to the cap (padded: rows x longest row)
            assert len(trainer._passes) == len(group_examples(lengths, eval_cap, padded=not padding_free)) \
                == 4 - padding_free
            assert all(tokens(p) <= eval_cap for p in trainer._passes), [tokens(p) for p in trainer._passes]
            if padding_free:  # nothing but the examples' own tokens
                assert sum(tokens(p) for p in trainer._passes) == sum(lengths)
        assert trainer.evaluate()["eval_loss"] == first and sum(calls) == len(dataset)  # reused, not collated again


def fake_trainer(step: int, running_pass: int | None, training: bool) -> SimpleNamespace:
    return SimpleNamespace(state=SimpleNamespace(global_step=step), running_pass=running_pass,
                           model=SimpleNamespace(training=training))


def test_out_of_memory_names_the_switches_with_this_runs_numbers(tmp_path):
    complete_checkpoint(tmp_path / "checkpoint-400")
    err = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.95 GiB. GPU 0 has a total ...")
    params = parse_params({"training": {"max_tokens_per_micro_batch": 8192}}).training
    message = str(out_of_memory_error(err, fake_trainer(411, 6912, True), params, str(tmp_path)))
    assert message.startswith("CUDA ran out of memory at step 412 in a pass of 6,912 tokens (peak ")
    assert message.endswith(
        " GiB, 1.95 GiB more wanted); lower training.max_tokens_per_micro_batch below 6,912 (now 8192), or set "
        f"training.gradient_checkpointing=true; the last checkpoint {tmp_path / 'checkpoint-400'} is kept and "
        "`dvc repro` resumes from it")

    # Uncapped, checkpointing already on, nothing saved yet.
    params = replace(params, max_tokens_per_micro_batch=None, gradient_checkpointing=True)
    message = str(out_of_memory_error(RuntimeError(), fake_trainer(3, 7000, True), params, str(tmp_path / "none")))
    assert message.endswith("); set training.max_tokens_per_micro_batch below 7,000 (now null: one pass per "
                            "micro-batch); no checkpoint had been saved yet, so `dvc repro` starts over")

    # Under a budget, the line says the allocator was held to it.
    budgeted = replace(params, max_memory_gib=12)
    message = str(out_of_memory_error(err, fake_trainer(3, 7000, True), budgeted, str(tmp_path / "none")))
    assert " GiB, 1.95 GiB more wanted, held to training.max_memory_gib=12); set training.max_tokens" in message

    # In the validation loss: the eval batch is what to lower.
    message = str(out_of_memory_error(RuntimeError(), fake_trainer(100, None, False), params, str(tmp_path)))
    assert message.startswith("CUDA ran out of memory computing the validation loss after step 100 (peak ")
    assert "lower training.per_device_eval_batch_size (now 8);" in message
    capped = replace(params, max_tokens_per_micro_batch=4096)
    message = str(out_of_memory_error(RuntimeError(), fake_trainer(100, None, False), capped, str(tmp_path)))
    assert "; lower training.max_tokens_per_micro_batch (now 4096; it also caps a validation pass);" in message
