"""How the train stage compiles its decoder layers, so that experiments reuse one compiled graph.

torch.compile keeps what it builds in its on-disk cache (TORCHINDUCTOR_CACHE_DIR, by default a folder under
the system's temporary directory). Entries are keyed by the traced graph, not by file paths, so every
experiment on a machine shares it, DVC's temporary experiment workspaces included; torch writes each entry
atomically, so concurrent experiments may share it too. What defeats the cache is a graph that differs, and
the LoRA rank would: it is a parameter shape, and parameter shapes are compiled as constants. Here the rank
is compiled as a symbol instead, so a graph compiled for r 8 serves r 16 and r 32.
"""

from __future__ import annotations

import logging

import torch
from peft.tuners.lora import LoraLayer
from transformers.modeling_layers import GradientCheckpointingLayer

log = logging.getLogger(__name__)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def rank_dims(layer: torch.nn.Module) -> dict[int, int]:
    """{id(weight): dim} for every LoRA matrix in the layer: the dimension that holds the rank
    (lora_A's weight is rank x in, lora_B's is out x rank)."""
    dims = {}
    for module in layer.modules():
        if isinstance(module, LoraLayer):
            for a in module.lora_A.values():
                dims[id(a.weight)] = 0
            for b in module.lora_B.values():
                dims[id(b.weight)] = 1
    return dims


def compile_rank_as_symbol(layers: list[torch.nn.Module]) -> None:
    """Let parameter shapes be symbolic, then pin every dimension but the LoRA rank: one graph for all ranks.

    Dynamo compiles parameter (and module attribute) shapes as constants by default. Lifting that for the
    whole process (only the decoder layers are compiled in it) and marking every other dimension static leaves
    exactly the rank symbolic. The rank only sizes the adapters' matmuls, which are library calls, so the
    generated kernels do not depend on it.
    """
    torch._dynamo.config.force_parameter_static_shapes = False
    torch._dynamo.config.force_nn_module_property_static_shapes = False
    for layer in layers:
        symbolic = rank_dims(layer)
        for tensor in [*layer.parameters(), *layer.buffers()]:
            for dim in range(tensor.dim()):
                if symbolic.get(id(tensor)) != dim:
                    torch._dynamo.mark_static(tensor, dim)


def skip_cpu_isa_probe() -> None:
    """Skip inductor's CPU vector-instruction test builds: the decoder layers compile to CUDA kernels only.

    Before it compiles or looks up a graph, inductor asks which CPU vector instructions its C++ code may use, in
    every new process, by compiling a small program per candidate (AVX2, AVX-512, its BF16 and VNNI forms, AMX)
    and loading each in a child Python. On an H200 host that was 22 s of a 48 s warm-cache compile
    (benchmarks/results/compile-nvidia-h200-2026-11-29-profiled-r8-warm.txt). Declaring the base check passed
    (`vec_isa_ok = True`) still leaves the AVX-512 extensions and AMX to test-build: six child processes, 25 s
    of every train stage (loop-nvidia-h200-2026-11-29-batched-tokenize-stage-timings.jsonl, the `-c` rows).
    Declaring it failed skips them all; inductor then emits no vectorized CPU code, which this model's compiled
    graphs, all on the GPU, never contain. TORCHINDUCTOR_VEC_ISA_OK, when set, still decides.
    """
    import torch._inductor.config as inductor_config

    if inductor_config.cpp.vec_isa_ok is None:
        inductor_config.cpp.vec_isa_ok = False


def start_compile_workers() -> None:
    """Start inductor's kernel-compiling worker processes now, while the data and the Trainer are prepared;
    otherwise they start at the first step, and kernels compile one by one in this process until they are up."""
    try:
        from torch._inductor.async_compile import AsyncCompile

        AsyncCompile.warm_pool()
        AsyncCompile.wakeup()
    except Exception as err:  # an internal API: a torch without it only compiles a little slower
        log.debug("could not start inductor's compile workers early: %s", err)


def compile_layers(model: torch.nn.Module, in_worker: bool = False) -> int:
    """torch.compile each decoder layer (one compiled graph serves them all: same code, parameters as inputs);
    returns how many were compiled. Row lengths change every step, so shapes are compiled as dynamic."""
    layers = decoder_layers(model)
    if in_worker:
        # Dynamo splits graphs compiled inside DistributedDataParallel at its gradient buckets (DDPOptimizer), for
        # models compiled whole. Each layer here compiles on its own and holds a few adapter weights, whose
        # gradients DDP exchanges after the backward pass anyway.
        torch._dynamo.config.optimize_ddp = False
    compile_rank_as_symbol(layers)
    skip_cpu_isa_probe()
    for layer in layers:
        layer.compile(dynamic=True)
    start_compile_workers()
    return len(layers)
