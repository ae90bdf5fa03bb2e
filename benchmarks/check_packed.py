"""The fast path on the GPU computes what the padded path computes: per-example losses and LoRA gradients.

    python -m benchmarks.check_packed [--examples 16] [--tiny]

tests/test_objective.py checks this on CPU, where packed attention runs one SDPA call per example. Here the
variable-length flash kernel does it, in bf16, on the Llama-3.2-1B-shaped model (benchmarks/harness/shapes.py)
with LoRA on q_proj and v_proj: padded batches under SDPA and packed rows under the "packed" attention, same
weights, same examples (SAMSum lengths), both against the padded path in float32. bf16 alone makes the two
differ from that reference; the packed path passes when it is no further from it than the padded bf16 path
(twice its distance, plus a small floor). Exits 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks.harness.lengths import examples_for
from benchmarks.harness.shapes import benchmark_model
from samsum_qlora.data.prompt import IGNORE_INDEX
from samsum_qlora.model import attention
from samsum_qlora.training.batching import FlatCollator, PadCollator
from samsum_qlora.training.objective import summary_loss

SLACK = 2.0  # how much further from the float32 reference than the padded bf16 path the packed path may be
FLOOR = 1e-4


def example_means(logits: torch.Tensor, labels: torch.Tensor, batch: dict) -> list[float]:
    """Mean loss over each example's summary tokens, from the logits kept at `batch["logits_to_keep"]`; the
    batch is padded rows or one packed row (`position_ids` restarting at each example)."""
    keep = batch["logits_to_keep"]
    targets = labels[:, keep + 1]
    token = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none",
                                              ignore_index=IGNORE_INDEX).view(targets.shape)
    if "position_ids" in batch:  # one row: the example of a position is the count of restarts before it
        example = (batch["position_ids"][0] == 0).cumsum(0)[keep + 1] - 1
        rows = [token[0][(example == i) & (targets[0] != IGNORE_INDEX)] for i in range(int(example.max()) + 1)]
    else:
        rows = [token[i][targets[i] != IGNORE_INDEX] for i in range(targets.shape[0])]
    return [r.mean().item() for r in rows]


def per_example(model, batch: dict, device: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Mean loss of each example in the batch, and the LoRA gradients of the batch's summary-token mean."""
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    labels = batch.pop("labels")
    model.zero_grad()
    outputs = model(**batch)
    summary_loss(outputs, labels).backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
    return example_means(outputs.logits.detach(), labels, batch), grads


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--tiny", action="store_true", help="2 layers, hidden size 128: a CPU smoke test")
    parser.add_argument("--model-dir", type=Path, default=None, help="where the random model is built (reused)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model_dir = benchmark_model(args.tiny, args.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    features = examples_for(tokenizer, args.examples, seed=1)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, attn_implementation="sdpa").to(device)
    base.config.use_cache = False
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    padded = per_example(model, PadCollator(tokenizer.pad_token_id)(features), device)
    base.set_attn_implementation(attention.register())
    packed = per_example(model, FlatCollator()(features), device)
    base.set_attn_implementation("sdpa")
    model.float()
    reference = per_example(model, PadCollator(tokenizer.pad_token_id)(features), device)
    kernel = "variable-length flash" if attention.flash_available(torch.device(device)) else "one SDPA per example"
    print(f"{device} ({kernel}), {len(features)} examples, {sum(len(f['input_ids']) for f in features)} tokens; "
          f"distance from the float32 padded path:")
    ok = True
    low = f"padded {str(dtype).removeprefix('torch.')}"
    for what, (losses, grads) in ((low, padded), ("packed", packed)):
        loss_error = max(abs(a - b) / abs(b) for a, b in zip(losses, reference[0], strict=True))
        grad_error = max(1 - torch.nn.functional.cosine_similarity(grads[n].flatten(), g.flatten(), dim=0).item()
                         for n, g in reference[1].items())
        print(f"  {what:12s} per-example loss: largest relative difference {loss_error:.2e}; "
              f"LoRA gradients: largest 1 - cosine {grad_error:.2e}")
        if what == low:
            loss_limit, grad_limit = SLACK * loss_error + FLOOR, SLACK * grad_error + FLOOR
        else:
            ok = loss_error <= loss_limit and grad_error <= grad_limit
    print("OK" if ok else f"MISMATCH: limits {loss_limit:.2e} (loss) and {grad_limit:.2e} (gradients)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
