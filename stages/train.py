"""Stage train: QLoRA fine-tuning of the base model on the tokenized summaries, with transformers' Trainer.

    python -m stages.train      (or: dvc repro train)

Reads data/tokenized/; writes models/adapter/ (LoRA adapter + tokenizer, loadable with
`PeftModel.from_pretrained(base, "models/adapter")`), metrics/train.json and the training curves under
metrics/curves/. Checkpoints go to models/checkpoints/; a later run with the same params and data resumes
from the newest one (training/checkpoints.py). Steps run in passes of at most training.max_tokens_per_micro_batch
tokens (training/microbatch.py); a run that still runs out of GPU memory stops with one line saying what to lower,
and resumes from its last checkpoint after that change.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from pathlib import Path

import pyarrow.compute as pc
import torch
from datasets import Dataset, DatasetDict, load_from_disk
from peft import LoraConfig, get_peft_model
from transformers import TrainingArguments, set_seed
from transformers.trainer_pt_utils import AcceleratorConfig

from samsum_qlora import distributed
from samsum_qlora.errors import PipelineError, run_stage
from samsum_qlora.files import atomic_dir, write_json
from samsum_qlora.memory import Shape, TrainPlan, adopt, budget_gib, plan_training
from samsum_qlora.model import attention
from samsum_qlora.model.compiling import compile_layers
from samsum_qlora.model.loading import (
    DevicePolicy,
    choose_device,
    load_base_model,
    load_config,
    load_tokenizer,
    peak_memory_gib,
)
from samsum_qlora.params import Params, load_params
from samsum_qlora.training.batching import FlatCollator, PadCollator
from samsum_qlora.training.checkpoints import (
    CHECKPOINTS,
    checkpoint_step,
    checkpoint_to_resume,
    resumable_checkpoint,
    resume_advice,
    run_fingerprint,
    train_resuming,
)
from samsum_qlora.training.curves import curves_callback
from samsum_qlora.training.microbatch import TokenCappedTrainer, out_of_memory_error
from samsum_qlora.training.objective import summary_loss

log = logging.getLogger(__name__)

TOKENIZED = "data/tokenized"
ADAPTER = "models/adapter"
METRICS = "metrics/train.json"  # what runs are compared by
RUN_FACTS = "metrics/train_run.json"  # the rest: steps, tokens, parameters, device, switches


def linear_module_names(model: torch.nn.Module) -> set[str]:
    """Leaf names of the model's linear layers (what lora.target_modules may name)."""
    return {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}


def check_target_modules(model: torch.nn.Module, targets: list[str]) -> None:
    available = linear_module_names(model)
    missing = [t for t in targets if t not in available]
    if missing:
        raise PipelineError(
            f"params.yaml: lora.target_modules names {missing}, which this model does not have; "
            f"its linear layers are: {', '.join(sorted(available))}"
        )


def prepare_base(base: torch.nn.Module, params: Params, policy: DevicePolicy) -> torch.nn.Module:
    """Freeze the base and set it up for training as the training.* switches say (see README, Performance)."""
    t = params.training
    # A KV cache is useless in training, and its presence stops transformers from reading packed sequences.
    base.config.use_cache = False
    if params.quantization.use_4bit and t.dequantize:
        # The NF4 weights unpacked once to the compute dtype: the values the 4-bit kernels compute with, without
        # unpacking every weight again in every forward and backward matmul.
        base = base.dequantize(dtype=policy.compute_dtype)
    for param in base.parameters():
        param.requires_grad_(False)
    if t.upcast_frozen:
        # What peft's prepare_model_for_kbit_training does: the frozen layers that are not 4-bit (embeddings,
        # norms, head) in float32, so the residual stream runs in float32 under autocast.
        for param in base.parameters():
            if param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ != "Params4bit":
                param.data = param.data.float()
    if t.padding_free:
        base.set_attn_implementation(attention.register())
    if t.gradient_checkpointing:
        enable_checkpointing(base)
    return base


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant activation checkpointing (the reentrant kind drops gradients of inputs that don't require
    them). transformers 5.24 renamed gradient_checkpointing_enable (still there, deprecated); 5.17 has only it."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def checkpointing_on(model: torch.nn.Module) -> bool:
    """Whether activation checkpointing is on (transformers 5.24 renamed is_gradient_checkpointing, 5.17 has
    only the old name)."""
    name = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else (
        "is_gradient_checkpointing")
    return bool(getattr(model, name, False))


def add_lora(base: torch.nn.Module, params: Params, policy: DevicePolicy) -> torch.nn.Module:
    """The base prepared for training (prepare_base) and wrapped with seeded LoRA adapters."""
    check_target_modules(base, params.lora.target_modules)
    base = prepare_base(base, params, policy)
    set_seed(params.seed)  # LoRA's A matrices are initialised randomly inside get_peft_model
    config = LoraConfig(
        r=params.lora.r,
        lora_alpha=params.lora.lora_alpha,
        target_modules=list(params.lora.target_modules),
        lora_dropout=params.lora.lora_dropout,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config)
    if params.training.compile:
        if policy.device == "cuda":
            log.info("compiled %d decoder layers (the first steps are slower)",
                     compile_layers(model, in_worker=distributed.in_worker()))
        else:
            log.info("training.compile applies on CUDA only: running eagerly on %s", policy.device)
    return model


def training_arguments(params: Params, policy: DevicePolicy, has_eval: bool) -> TrainingArguments:
    t = params.training
    return TrainingArguments(
        output_dir=CHECKPOINTS,
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=policy.optim,
        bf16=policy.bf16,
        fp16=policy.device == "cuda" and policy.compute_dtype == torch.float16,
        logging_steps=t.logging_steps,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=t.eval_steps,
        save_strategy=t.save_strategy,
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        seed=params.seed,
        data_seed=params.seed,
        report_to="none",  # curves go through our own DVCLiveCallback: report_to="dvclive" rewrites dvc.yaml
        remove_unused_columns=False,
        prediction_loss_only=True,
        include_num_input_tokens_seen="non_padding",
        # Several processes: each batch of per_device_train_batch_size sequences, drawn as one process draws it, is
        # split between them (the same sequences per optimizer step and the same order as one process); the loss
        # is divided by the step's loss tokens counted over all processes (average_tokens_across_devices).
        accelerator_config=AcceleratorConfig(split_batches=True),
        average_tokens_across_devices=True,
        ddp_find_unused_parameters=False,  # every adapter weight gets a gradient in every pass
        dataloader_num_workers=0,
        use_cpu=policy.device == "cpu",
        save_only_model=False,
        disable_tqdm=not distributed.is_main(),
    )


def build_trainer(
    params: Params,
    policy: DevicePolicy,
    model: torch.nn.Module,
    tokenizer,
    train: Dataset,
    validation: Dataset | None,
    callbacks: list,
    output_dir: str = CHECKPOINTS,
    plan: TrainPlan | None = None,
) -> TokenCappedTrainer:
    """The Trainer of the train stage: our collators (labels kept, never rebuilt), the summary-only loss,
    passes of at most training.max_tokens_per_micro_batch tokens and, if the memory plan says so, checkpointing
    decided per pass."""
    args = training_arguments(params, policy, has_eval=validation is not None)
    args.output_dir = output_dir
    distributed.one_gpu_per_process(args)
    return TokenCappedTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=validation,
        data_collator=FlatCollator() if params.training.padding_free else PadCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        compute_loss_func=summary_loss,
        callbacks=callbacks,
        max_tokens=params.training.max_tokens_per_micro_batch,
        layers_to_checkpoint=plan.layers_to_checkpoint if plan is not None and plan.pass_limits else None,
    )


def final_eval_loss(trainer: TokenCappedTrainer) -> float:
    """The validation loss of the trained adapter: the one logged at the last step if there is one (evaluating
    again would only draw that point twice), else a new evaluation."""
    last = next((e for e in reversed(trainer.state.log_history) if "eval_loss" in e), None)
    if last is not None and last.get("step") == trainer.state.global_step:
        return last["eval_loss"]
    return trainer.evaluate()["eval_loss"]


def file_mb(path: str | Path) -> float:
    return Path(path).stat().st_size / 1e6


def plan_memory(params: Params, policy: DevicePolicy, train_data: Dataset) -> tuple[Params, TrainPlan | None]:
    """The params with the speed and memory switches that fit training.max_memory_gib (else the GPU's memory), the
    plan, and, for an explicit budget, torch's allocator held to it (samsum_qlora/memory.py)."""
    t = params.training
    budget, source = budget_gib(t.max_memory_gib, policy.device)
    if budget is None:
        return params, None
    per_process = max(1, t.per_device_train_batch_size // t.num_processes)  # the batch is split between processes
    lengths = sorted(train_data["length"])
    labels = pc.list_flatten(train_data.data.column("labels"))
    loss_fraction = pc.sum(pc.not_equal(labels, -100)).as_py() / max(1, len(labels))
    largest = per_process * lengths[-1] if not t.padding_free else sum(lengths[-per_process:])
    plan = plan_training(
        Shape.from_config(load_config(params.model)), t, budget, use_4bit=params.quantization.use_4bit,
        element=policy.compute_dtype.itemsize, lora_r=params.lora.r, lora_targets=params.lora.target_modules,
        mean_step_tokens=per_process * statistics.fmean(lengths), largest_step_tokens=largest,
        longest_example=lengths[-1], loss_fraction=loss_fraction,
        double_quant=params.quantization.bnb_4bit_use_double_quant,
    )
    adopt(plan, source, t.max_memory_gib, policy.device, log)
    return dataclasses.replace(params, training=plan.apply(t)), plan


def launch_workers(params: Params) -> None:
    """Train as training.num_processes data-parallel processes: the checkpoint folder is prepared here, once, and the
    workers (this module again, under accelerate's launcher) train from it."""
    distributed.check_training_processes(params.training)
    if not Path(TOKENIZED).is_dir():
        raise PipelineError(f"{TOKENIZED} not found: run `dvc repro tokenize_mask` first")
    if distributed.main_machine():  # the others share its folder (README, Several GPUs) and must not clear it
        resume_from = checkpoint_to_resume(run_fingerprint(params, TOKENIZED))
        if resume_from:
            log.info("resuming from %s", resume_from)
    try:
        distributed.launch("stages.train", [], params.training.num_processes, "training")
    except distributed.WorkerFailed as err:
        raise PipelineError(f"{err}; {resume_advice()}") from None


def main() -> None:
    params = load_params()
    if params.training.num_processes > 1 and not distributed.in_worker():
        launch_workers(params)
    else:
        train(params)


def train(params: Params) -> None:
    """The stage in this process: all of it, or this process's share when it is one of several workers."""
    distributed.quiet_replicas()
    policy = choose_device(params.quantization, params.training.optim)
    log.info("device: %s", policy.reason)
    try:
        data = load_from_disk(TOKENIZED)
    except FileNotFoundError:
        raise PipelineError(f"{TOKENIZED} not found: run `dvc repro tokenize_mask` first") from None
    if not isinstance(data, DatasetDict) or "train" not in data:
        raise PipelineError(f"{TOKENIZED} has no train split: re-run `dvc repro tokenize_mask`")
    params, plan = plan_memory(params, policy, data["train"])
    set_seed(params.seed)
    tokenizer = load_tokenizer(params.model)
    model = add_lora(load_base_model(params.model, params.quantization, policy), params, policy)
    trainable, total = model.get_nb_trainable_parameters()  # counts 4-bit packed weights at their real size

    fingerprint = run_fingerprint(params, TOKENIZED)
    # A worker reads the folder its launching process prepared.
    resume_from = resumable_checkpoint(fingerprint) if distributed.in_worker() else checkpoint_to_resume(fingerprint)
    if resume_from and not distributed.in_worker():  # else said by the launching process
        log.info("resuming from %s", resume_from)
    callbacks = curves_callback(resume=bool(resume_from)) if distributed.is_main() else []
    has_eval = "validation" in data and len(data["validation"]) > 0
    trainer = build_trainer(params, policy, model, tokenizer, data["train"], data["validation"] if has_eval else None,
                            callbacks, plan=plan)
    start = time.perf_counter()
    try:
        result, tokens = train_resuming(trainer, resume_from)  # tokens of all processes
        runtime = time.perf_counter() - start
        eval_loss = final_eval_loss(trainer) if has_eval else None
    except torch.OutOfMemoryError as err:
        raise out_of_memory_error(err, trainer, params.training) from None
    for callback in callbacks:
        callback.live.end()
    # Every process's peak and passes, gathered on all of them.
    per_process = distributed.gather([(round(peak_memory_gib(), 3), trainer.passes, trainer.checkpointed_layers)])
    if not distributed.is_main():
        return

    with atomic_dir(ADAPTER) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").unlink(missing_ok=True)  # peft's empty card template; the card stage writes the card
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    micro_batches = sum(passes for _, passes, _ in per_process)
    # Under a plan that checkpoints per pass: the decoder layers a pass checkpointed, on average.
    checkpointed_mean = (sum(layers for *_, layers in per_process) / max(1, micro_batches)
                         if trainer.layers_to_checkpoint else None)
    resumed_step = checkpoint_step(resume_from) if resume_from else 0
    # Short names: `dvc exp show` opens with these columns, and a terminal is 160 characters wide.
    write_json(
        METRICS,
        {
            "train_loss": round(losses[-1], 4) if losses else None,
            "eval_loss": round(eval_loss, 4) if eval_loss is not None else None,
            "tokens_per_s": round(tokens / runtime, 1),  # all processes together
            "peak_memory_gib": max(peak for peak, *_ in per_process),  # of the fullest GPU (or process on CPU)
            "runtime_s": round(runtime, 2),
            # The process count is the training.num_processes column of `dvc exp show` and num_processes below:
            # one more metric column would push the ROUGE columns past a 160-column terminal.
        },
    )
    write_json(
        RUN_FACTS,
        {
            "train_loss_mean": round(result.training_loss, 4),
            "steps": trainer.state.global_step,
            "epochs": round(trainer.state.epoch or 0, 3),
            "resumed_from_step": resumed_step,
            "train_tokens": int(tokens),
            "trainable_params": trainable,
            "total_params": total,
            "trainable_percent": round(100 * trainable / total, 4),
            "adapter_mb": round(file_mb(Path(ADAPTER) / "adapter_model.safetensors"), 3),
            **policy.describe(),
            "num_processes": len(per_process),
            "peak_memory_gib_per_process": [peak for peak, *_ in per_process],
            "quantized": params.quantization.use_4bit,
            "optim": policy.optim,
            "max_tokens_per_micro_batch": params.training.max_tokens_per_micro_batch,
            "micro_batches": micro_batches,  # forward/backward passes, all processes
            "gradient_checkpointing": params.training.gradient_checkpointing,
            "checkpointed_layers_per_pass": round(checkpointed_mean, 2) if checkpointed_mean is not None else None,
            "padding_free": params.training.padding_free,
            "attention": model.get_base_model().config._attn_implementation,
            "dequantized": params.quantization.use_4bit and params.training.dequantize,
            "compiled": params.training.compile and policy.device == "cuda",
            "upcast_frozen": params.training.upcast_frozen,
            "memory_plan": plan.describe() if plan else None,
        },
    )
    if checkpointed_mean is not None:
        log.info("activation checkpointing per pass: %.1f of %d decoder layers on average over %d passes",
                 checkpointed_mean, len(plan.pass_limits) - 1, micro_batches)
    log.info("adapter saved to %s", ADAPTER)


if __name__ == "__main__":
    run_stage(main)
