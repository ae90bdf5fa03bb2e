"""The train stage's Trainer: its TrainingArguments from training.*, and the TokenCappedTrainer with the project's
collators (labels kept, never rebuilt), the summary-only loss and the memory plan's passes."""

from __future__ import annotations

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase, TrainerCallback, TrainingArguments
from transformers.trainer_pt_utils import AcceleratorConfig

from samsum_qlora import distributed
from samsum_qlora.memory.planning import TrainPlan
from samsum_qlora.model.loading import DevicePolicy
from samsum_qlora.params import Params
from samsum_qlora.paths import CHECKPOINTS
from samsum_qlora.training.batching import FlatCollator, PadCollator
from samsum_qlora.training.microbatch import TokenCappedTrainer
from samsum_qlora.training.objective import summary_loss
from samsum_qlora.training.schedule import warmup_setting


def training_arguments(params: Params, policy: DevicePolicy, has_eval: bool) -> TrainingArguments:
    """transformers' TrainingArguments as training.* and the device policy set them."""
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
        warmup_steps=warmup_setting(t),
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=policy.optim,
        bf16=policy.bf16,
        fp16=policy.device == "cuda" and policy.compute_dtype == torch.float16,
        logging_steps=t.logging_steps,
        logging_nan_inf_filter=False,  # log an inf/NaN loss as it is: the non-finite guard (guards.py) acts on it
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
    tokenizer: PreTrainedTokenizerBase,
    train: Dataset,
    validation: Dataset | None,
    callbacks: list[TrainerCallback],
    output_dir: str = CHECKPOINTS,
    plan: TrainPlan | None = None,
) -> TokenCappedTrainer:
    """The Trainer of the train stage: our collators, the summary-only loss, passes of at most the plan's token cap
    and, if the plan says so, checkpointing decided per pass (plan None: training.* as set)."""
    plan = plan or TrainPlan.as_set(params.training)
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
        max_tokens=plan.max_tokens_per_micro_batch,
        layers_to_checkpoint=plan.layers_to_checkpoint if plan.pass_limits else None,
    )


def final_eval_loss(trainer: TokenCappedTrainer) -> float:
    """The validation loss of the trained adapter: the one logged at the last step if there is one (evaluating
    again would only draw that point twice), else a new evaluation."""
    last = next((e for e in reversed(trainer.state.log_history) if "eval_loss" in e), None)
    if last is not None and last.get("step") == trainer.state.global_step:
        return last["eval_loss"]
    return trainer.evaluate()["eval_loss"]
