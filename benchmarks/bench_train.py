"""Training throughput: the tutorial's setup vs TRL's padding-free SFTTrainer vs this project's train stage.

    python -m benchmarks.bench_train [--setups tutorial,trl,project] [--steps 20] [--warmup 5] [--tiny]
                                     [--shape 135M|1B|3B|8B] [--out benchmarks/results] [--label L]
                                     [--set training.padding_free=true ...]

All setups run in one process on the same device, one after the other, on the same synthetic SAMSum-length
examples (benchmarks/harness/lengths.py) and a random-weight Llama-3.2-1B-shaped model (benchmarks/harness/shapes.py;
`--shape 3B` / `8B`: Llama-3.2-3B's or Llama-3.1-8B's shape, `135M`: a 30-layer, 135M-parameter small instruct
model's, results in train-<device>-<date>-<shape>.json;
`--label L` appends -L):
NF4 with double quantization, bf16 compute, LoRA r 8 / alpha 16 / dropout 0.05 on q_proj and v_proj,
16 sequences per optimizer step. Reported per setup: real (non-padding) tokens per second over the timed
optimizer steps (after the warm-up steps), peak memory, and the loss at the last step. `--tiny` runs a
2-layer model with hidden size 128 for a few steps, on CPU when there is no GPU.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from benchmarks.harness import report
from benchmarks.harness.lengths import describe, examples_for
from benchmarks.harness.overrides import parse_overrides
from benchmarks.harness.setups import SEQUENCES_PER_STEP, Bench, SetupSkipped, compute_dtype, measure
from benchmarks.harness.shapes import SHAPES, TINY, benchmark_model

log = logging.getLogger(__name__)

SETUPS = ("tutorial", "trl", "project")  # built by benchmarks/harness/setups.py


def run(
    setups: list[str],
    steps: int,
    warmup: int,
    tiny: bool = False,
    out_dir: str | Path = report.RESULTS,
    model_dir: str | Path | None = None,
    tokenizer_dir: str | Path | None = None,
    project_overrides: dict[str, Any] | None = None,
    shape_name: str = "1B",
    label: str | None = None,
) -> tuple[dict[str, Any], Path]:
    """Run the setups in order; return the report and the JSON file it was written to."""
    shape = TINY if tiny else SHAPES[shape_name]
    started = time.perf_counter()
    model_dir = benchmark_model(tiny, model_dir, tokenizer_dir, shape_name)
    log.info("model ready in %.1f s: %s", time.perf_counter() - started, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    examples = examples_for(tokenizer, (warmup + steps) * SEQUENCES_PER_STEP, seed=0)
    scratch = tempfile.TemporaryDirectory(prefix="bench-train-")
    bench = Bench(model_dir, examples, steps, warmup, Path(scratch.name), project_overrides or {})

    out = report.header(
        "train",
        {
            "setups": setups,
            "steps": steps,
            "warmup_steps": warmup,
            "sequences_per_step": SEQUENCES_PER_STEP,
            "tiny": tiny,
            "shape": "tiny" if tiny else shape_name,
            "model_shape": asdict(shape),
            "parameters": shape.parameters(),
            "quantization": "nf4, double quant, compute " + str(compute_dtype()).removeprefix("torch."),
            "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"]},
            "data": describe(examples),
            "project_overrides": bench.project_overrides,
        },
    )
    if torch.cuda.is_available():
        out["peak_memory"] += ", less what earlier setups still held when it began (left_over_gib)"
    results, skipped, failed = [], [], []
    for name in setups:
        log.info("setup %s: %d warm-up + %d timed steps", name, warmup, steps)
        try:
            results.append(measure(name, bench, tokenizer.pad_token_id))
        except SetupSkipped as err:
            print(f"skipping {name}: {err}", file=sys.stderr)
            skipped.append({"setup": name, "reason": str(err)})
        except Exception as err:  # one broken setup must not cost the numbers of the others
            traceback.print_exc()
            failed.append({"setup": name, "error": f"{type(err).__name__}: {err}"[:1000]})
    scratch.cleanup()
    reference = next((r["tokens_per_second"] for r in results if r["setup"] == "tutorial"), None)
    for r in results:
        r["ratio_to_tutorial"] = round(r["tokens_per_second"] / reference, 3) if reference else None
    out.update({"results": results, "skipped": skipped, "failed": failed})
    shape_label = None if shape_name == "1B" else shape_name.lower()
    path = report.write_results(out, out_dir, tiny, report.file_label(shape_label, label))
    return out, path


def print_report(out: dict[str, Any], path: Path) -> None:
    c = out["config"]
    print(f"\n{out['device']}, {c['shape']} shape: {c['steps']} timed optimizer steps after {c['warmup_steps']} "
          "warm-up steps, "
          f"{c['sequences_per_step']} sequences per step")
    columns = [
        ("setup", "setup"),
        ("real tokens/s", "tokens_per_second"),
        ("peak GiB", "peak_memory_gib"),
        ("ratio to (a)", "ratio_to_tutorial"),
        ("final loss", "final_loss"),
    ]
    print(report.table(columns, out["results"]))
    print(f"peak memory: {out['peak_memory']}")
    for s in out["skipped"]:
        print(f"skipped {s['setup']}: {s['reason']}")
    for f in out["failed"]:
        print(f"FAILED {f['setup']}: {f['error']}")
    print(f"written to {path}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setups", default=",".join(SETUPS), help=f"comma-separated, from {', '.join(SETUPS)}")
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps (default 20; --tiny: 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; --tiny: 1)")
    parser.add_argument("--tiny", action="store_true", help="2 layers, hidden 128, vocabulary 2048: a smoke test")
    parser.add_argument("--shape", choices=list(SHAPES), default="1B",
                        help="the model's shape: Llama-3.2-1B (default), Llama-3.2-3B, Llama-3.1-8B, or 135M "
                        "(SmolLM2-135M-Instruct's)")
    parser.add_argument("--out", type=Path, default=report.RESULTS, help="folder for the JSON results")
    parser.add_argument("--label", default=None, help="appended to the file name (after the shape), e.g. ckpt")
    parser.add_argument("--model-dir", type=Path, default=None, help="where the random model is built (reused)")
    parser.add_argument("--tokenizer", type=Path, default=None, help="default: offline/tiny-llama")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="params.yaml override for the project setup, e.g. training.padding_free=true")
    args = parser.parse_args(argv)
    setups = [s.strip() for s in args.setups.split(",") if s.strip()]
    unknown = [s for s in setups if s not in SETUPS]
    if unknown or not setups:
        parser.error(f"unknown setups {unknown}; choose from {', '.join(SETUPS)}")
    steps = args.steps if args.steps is not None else (2 if args.tiny else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 5)
    if steps < 1 or warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    out, path = run(
        setups, steps, warmup, args.tiny, args.out, args.model_dir, args.tokenizer, parse_overrides(args.set),
        args.shape, args.label,
    )
    print_report(out, path)
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    sys.exit(1 if main()["failed"] else 0)
