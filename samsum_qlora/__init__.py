"""The library behind the stages: data, model, training, evaluation, memory, distributed launching, files."""

import logging
import os
import sys

# No code fetched from the hub runs here, compiled kernels included (the rule trust_remote_code=False sets for
# model code). transformers >= 5.25 installs `kernels`, through which it would swap model layers for hub kernels
# at every from_pretrained, and bitsandbytes (at import, on CPUs with AVX-512 BF16) would load a hub kernel for
# its 4-bit matmul. Both then use their built-in kernels: transformers' switch is off, and `kernels` cannot be
# imported in a process that imports the stages. This runs before any stage imports transformers or peft.
os.environ["USE_HUB_KERNELS"] = "NO"
sys.modules["kernels"] = None  # type: ignore[assignment]
# bitsandbytes says once, at import, that the hub kernel is unavailable and its own is used: what is wanted.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
