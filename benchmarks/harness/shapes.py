"""A random-weight model with the exact shape of Llama-3.2-1B (or 3.2-3B, 3.1-8B, or a 135M-parameter small
instruct model of the Llama architecture), saved so that `from_pretrained` loads it offline.

    python -m benchmarks.harness.shapes --out /tmp/samsum-bench/llama-1b-shaped [--shape 135M|1B|3B|8B] [--tiny]

Speed and memory depend on the shape of the network, not on what its weights learned, so the benchmarks use
this instead of the gated hub checkpoint: nothing is downloaded. The tokenizer is a copy of the offline
profile's (offline/tiny-llama); its ids all fall inside the model's vocabulary.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
OFFLINE_TOKENIZER = ROOT / "offline" / "tiny-llama"
BUNDLED_TRAIN_SPLIT = ROOT / "data" / "samples" / "train.json"
MARKER = "benchmark_model.json"  # what was built, so a matching folder is reused instead of rebuilt


@dataclass(frozen=True)
class LlamaShape:
    """Llama-3.2-1B's config.json values (the hub model's); `SHAPES` holds the bigger ones, `TINY` shrinks it
    for CPU smoke tests."""

    vocab_size: int = 128256
    hidden_size: int = 2048
    intermediate_size: int = 8192
    num_hidden_layers: int = 16
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 64
    rope_theta: float = 500000.0
    rope_scaling_factor: float | None = 32.0  # Llama 3's long-context scaling; None: plain RoPE
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True

    def config(self, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            rope_theta=self.rope_theta,
            rope_scaling=None if self.rope_scaling_factor is None else {
                "rope_type": "llama3",
                "factor": self.rope_scaling_factor,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_word_embeddings,
            hidden_act="silu",
            attention_bias=False,
            mlp_bias=False,
            initializer_range=0.02,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )


    def parameters(self) -> int:
        """How many parameters a model of this shape has (embeddings, decoder layers, final norm, LM head)."""
        q_out, kv_out = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        layer = (self.hidden_size * (2 * q_out + 2 * kv_out)  # q, k, v, o projections
                 + 3 * self.hidden_size * self.intermediate_size  # gate, up, down
                 + 2 * self.hidden_size)  # the two RMSNorms
        embeddings = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else embeddings
        return embeddings + self.num_hidden_layers * layer + self.hidden_size + head


LLAMA_3_2_1B = LlamaShape()
LLAMA_3_2_3B = LlamaShape(hidden_size=3072, num_hidden_layers=28, num_attention_heads=24, head_dim=128)
LLAMA_3_1_8B = LlamaShape(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, head_dim=128,
                          rope_scaling_factor=8.0, tie_word_embeddings=False)
# SmolLM2-135M-Instruct's config.json: 30 thin layers and a 49,152-token vocabulary, tied; the small model whose
# speed shows what per-kernel launch costs leave of a step.
SMALL_135M = LlamaShape(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                        num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=100000.0,
                        rope_scaling_factor=None, max_position_embeddings=8192)
SHAPES = {"135M": SMALL_135M, "1B": LLAMA_3_2_1B, "3B": LLAMA_3_2_3B, "8B": LLAMA_3_1_8B}
TINY = LlamaShape(
    vocab_size=2048, hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32,
)


def shape_with(
    base: LlamaShape = LLAMA_3_2_1B,
    vocab_size: int | None = None,
    layers: int | None = None,
    hidden: int | None = None,
    intermediate: int | None = None,
    heads: int | None = None,
    kv_heads: int | None = None,
) -> LlamaShape:
    """`base` with some sizes replaced; head_dim follows hidden / heads when either changes."""
    heads = heads or base.num_attention_heads
    hidden = hidden or base.hidden_size
    changed = hidden != base.hidden_size or heads != base.num_attention_heads
    return replace(
        base,
        vocab_size=vocab_size or base.vocab_size,
        num_hidden_layers=layers or base.num_hidden_layers,
        hidden_size=hidden,
        intermediate_size=intermediate or base.intermediate_size,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or min(base.num_key_value_heads, heads),
        head_dim=hidden // heads if changed else base.head_dim,
    )


def default_tokenizer_dir(scratch: str | Path | None = None) -> Path:
    """offline/tiny-llama when it has been built; else a tokenizer trained on the bundled samples, in `scratch`."""
    if (OFFLINE_TOKENIZER / "tokenizer_config.json").is_file():
        return OFFLINE_TOKENIZER
    from offline.build_tiny_model import train_tokenizer

    out = Path(scratch or Path(tempfile.gettempdir()) / "samsum-bench") / "tokenizer"
    if not (out / "tokenizer_config.json").is_file():
        rows = json.loads(BUNDLED_TRAIN_SPLIT.read_text(encoding="utf-8"))
        log.info("%s not built yet: training the same kind of tokenizer on %s", OFFLINE_TOKENIZER, BUNDLED_TRAIN_SPLIT)
        train_tokenizer([r["dialogue"] for r in rows] + [r["summary"] for r in rows]).save_pretrained(out)
    return out


def build_llama_1b_shaped(
    out_dir: str | Path,
    tokenizer_dir: str | Path,
    vocab_size: int | None = None,
    layers: int | None = None,
    hidden: int | None = None,
    intermediate: int | None = None,
    heads: int | None = None,
    kv_heads: int | None = None,
    seed: int = 0,
    shape: LlamaShape | None = None,
) -> Path:
    """Write a seeded random-weight bf16 Llama (safetensors) and a copy of the tokenizer to `out_dir`.

    A folder already holding the same shape, seed and tokenizer is reused as it is.
    """
    out_dir = Path(out_dir)
    shape = shape_with(shape or LLAMA_3_2_1B, vocab_size, layers, hidden, intermediate, heads, kv_heads)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), trust_remote_code=False)
    if len(tokenizer) > shape.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model's vocabulary is {shape.vocab_size}")
    recipe = {
        "shape": asdict(shape),
        "seed": seed,
        "dtype": "bfloat16",
        "tokenizer": {"size": len(tokenizer), "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id,
                      "pad": tokenizer.pad_token_id, "chat_template": tokenizer.chat_template},
    }
    marker = out_dir / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == recipe and any(out_dir.glob("*.safetensors")):
        return out_dir
    if out_dir.exists():
        shutil.rmtree(out_dir)

    torch.manual_seed(seed)
    model = LlamaForCausalLM(shape.config(tokenizer)).to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    marker.write_text(json.dumps(recipe, indent=2, allow_nan=False) + "\n")
    log.info("wrote a random %s-parameter Llama to %s", f"{n_params:,}", out_dir)
    return out_dir


def benchmark_model(
    tiny: bool = False, model_dir: str | Path | None = None, tokenizer_dir: str | Path | None = None,
    shape: str = "1B",
) -> Path:
    """The benchmarks' model folder (default: <tmp>/samsum-bench/llama-<shape>-shaped, or tiny), built on first
    use and reused after. `shape`: a key of SHAPES; `tiny` overrides it."""
    cache = Path(tempfile.gettempdir()) / "samsum-bench"
    model_dir = Path(model_dir or cache / ("tiny" if tiny else f"llama-{shape.lower()}-shaped"))
    return build_llama_1b_shaped(
        model_dir, tokenizer_dir or default_tokenizer_dir(cache), shape=TINY if tiny else SHAPES[shape]
    )


def main() -> None:
    """Build the random-weight model in --out."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, default=None, help="default: offline/tiny-llama")
    parser.add_argument("--shape", choices=list(SHAPES), default="1B",
                        help="135M (SmolLM2-135M's shape), or Llama-3.2-1B, 3.2-3B or 3.1-8B")
    parser.add_argument("--tiny", action="store_true", help="2 layers, hidden 128, vocabulary 2048")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    tokenizer_dir = args.tokenizer or default_tokenizer_dir()
    build_llama_1b_shaped(args.out, tokenizer_dir, seed=args.seed, shape=TINY if args.tiny else SHAPES[args.shape])


if __name__ == "__main__":
    main()
