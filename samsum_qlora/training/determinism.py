"""training.deterministic: what bit-identical reruns need from PyTorch, cuBLAS and the compiler, set once per
process before the model is built."""

from __future__ import annotations

import logging
import os

import torch

from samsum_qlora.errors import PipelineError

log = logging.getLogger(__name__)

# cuBLAS's workspace setting under which its matmuls reduce in a fixed order; read when a handle is created.
CUBLAS_WORKSPACE = ":4096:8"


def make_deterministic() -> None:
    """Deterministic kernels only (an op without one fails loudly rather than varying quietly), cuBLAS's
    fixed-order workspace, cuDNN without autotuning, and Inductor without timing-based kernel choices (they pick
    different reduction orders run to run). transformers' full_determinism would also serialise every CUDA launch
    (CUDA_LAUNCH_BLOCKING), which determinism does not need."""
    if "CUBLAS_WORKSPACE_CONFIG" not in os.environ:  # a value the user set (e.g. :16:8) is as good
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    import torch._inductor.config as inductor  # PyTorch 2.8+: skips benchmarking that changes numerics

    if hasattr(inductor, "deterministic"):
        inductor.deterministic = True
    log.info("training.deterministic: deterministic kernels only; reruns give the same adapter on this machine")


def nondeterministic_op_error(err: RuntimeError) -> PipelineError | None:
    """The one-line error for an op that has no deterministic kernel under training.deterministic, else None."""
    text = str(err)
    if "does not have a deterministic implementation" not in text:
        return None
    op = text.split(" does not have", 1)[0].strip().splitlines()[-1]
    return PipelineError(f"training.deterministic: {op} has no deterministic kernel on this device, so this run cannot "
                         "repeat bit for bit; set training.deterministic to false (nothing was saved)")
