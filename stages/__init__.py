"""The pipeline's stages (one module per DVC stage) and the small modules they share."""

import logging

# Set before any stage imports peft, which imports bitsandbytes: on CPUs with AVX-512 BF16, bitsandbytes looks
# at import for an optional package that fetches kernels from the hub, and warns when it is absent; its
# built-in kernel is used instead, which is what the pipeline wants (no code fetched at run time).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
