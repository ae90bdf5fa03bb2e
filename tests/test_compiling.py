"""The compiled decoder layers: one graph serves every LoRA rank, and computes what the eager layers compute.

Compiled with dynamo's "eager" backend: what is traced, guarded and reused is dynamo's decision, the same as
under inductor (CUDA only in the train stage), without minutes of code generation on CPU.
"""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from conftest import TINY_MODEL
from samsum_qlora.model.compiling import compile_rank_as_symbol, decoder_layers, rank_dims


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches and counters emptied, and the global config it changes put back afterwards."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    config = torch._dynamo.config
    saved = {name: getattr(config, name)
             for name in ("force_parameter_static_shapes", "force_nn_module_property_static_shapes")}
    torch._dynamo.reset()
    counters.clear()
    with config.patch(saved):
        yield counters
    torch._dynamo.reset()


def _lora_model(r: int, alpha: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(TINY_MODEL),
        LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    for name, weight in model.named_parameters():
        if "lora_B" in name:  # non-zero, so that the adapters (and their rank) change the output
            torch.nn.init.normal_(weight, std=0.02)
    return model


def _losses_and_new_graphs(ranks, symbolic: bool, counters) -> list[tuple[float, float, int]]:
    """For each (r, alpha): the eager loss, the compiled loss, and how many graphs dynamo compiled for it."""
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29, 33, 37, 41]])
    out = []
    for r, alpha in ranks:
        model = _lora_model(r, alpha)
        eager = model(input_ids=ids, labels=ids).loss.item()
        layers = decoder_layers(model)
        if symbolic:
            compile_rank_as_symbol(layers)
        for layer in layers:
            layer.compile(dynamic=True, backend="eager")
        before = counters["stats"]["unique_graphs"]
        compiled = model(input_ids=ids, labels=ids).loss.item()
        out.append((eager, compiled, counters["stats"]["unique_graphs"] - before))
    return out


def test_rank_dims_name_the_rank_of_each_lora_matrix():
    model = _lora_model(8, 16)
    layer = decoder_layers(model)[0]
    dims = rank_dims(layer)
    shapes = {name: (tuple(p.shape), dims.get(id(p))) for name, p in layer.named_parameters() if "lora" in name}
    assert len(shapes) == 4  # A and B of q_proj and v_proj
    for name, (shape, dim) in shapes.items():
        assert dim == (0 if "lora_A" in name else 1), name
        assert shape[dim] == 8, name
    assert all(id(p) not in dims for name, p in layer.named_parameters() if "lora" not in name)


def test_one_graph_serves_every_rank_and_alpha(fresh_dynamo):
    ranks = [(8, 16), (16, 16), (32, 16), (4, 32)]
    results = _losses_and_new_graphs(ranks, symbolic=True, counters=fresh_dynamo)
    for (r, alpha), (eager, compiled, _) in zip(ranks, results, strict=True):
        assert compiled == pytest.approx(eager, abs=1e-6), (r, alpha)
    assert results[0][2] >= 1  # the first rank compiles ...
    assert [new for *_, new in results[1:]] == [0, 0, 0]  # ... and every later rank reuses its graphs


def test_without_it_each_rank_compiles_again(fresh_dynamo):
    # The default behaviour this module changes: parameter shapes are constants, so a new rank is a new graph.
    results = _losses_and_new_graphs([(8, 16), (16, 16)], symbolic=False, counters=fresh_dynamo)
    assert results[1][2] >= 1


def test_the_cpu_isa_probe_builds_nothing_unless_the_user_decided(monkeypatch):
    """No candidate instruction set, base or extension (AVX-512 BF16/VNNI, AMX), is test-built and loaded."""
    import torch._inductor.config as inductor_config
    from torch._inductor import cpu_vec_isa

    from samsum_qlora.model.compiling import skip_cpu_isa_probe

    def forget_answers():  # each ISA caches its answer per process (functools.cache on __bool__)
        for isa in candidates:
            getattr(isa.__bool__, "cache_clear", lambda: None)()

    builds = []
    monkeypatch.setattr(cpu_vec_isa.VecISA, "check_build", lambda self, code: builds.append(str(self)) or True)
    candidates = [cpu_vec_isa.VecAMX, cpu_vec_isa.VecAVX512VNNI, cpu_vec_isa.VecAVX512, cpu_vec_isa.VecAVX2]
    forget_answers()
    with inductor_config.patch({"cpp.vec_isa_ok": None}):
        skip_cpu_isa_probe()
        assert [bool(isa()) for isa in candidates] == [False] * 4
        assert cpu_vec_isa.valid_vec_isa_list.__wrapped__() == []
    forget_answers()
    assert builds == []
    with inductor_config.patch({"cpp.vec_isa_ok": True}):  # TORCHINDUCTOR_VEC_ISA_OK=1: the user's choice stands
        skip_cpu_isa_probe()
        assert inductor_config.cpp.vec_isa_ok is True
