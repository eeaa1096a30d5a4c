"""consa.search.fused_kernels: liger-kernel's kernels go onto the right modules, take over only for CUDA tensors and
come off again; the memory estimate counts what they save. (Their numerics on a GPU: bench/search_scale.py
--mode saved compares the gate gradient with and without them.)"""

import sys

import torch

import tiny
from consa.search import fused_kernels
from consa.search import memory
from consa.model.hybrid_attention import install
from test_memory import GIB, llama3_8b

ALL = ("rms_norm", "swiglu", "rope")


def gate_gradient(model):
    hybrid = install(model, window=16)
    z = torch.full((2, 2), 0.5, requires_grad=True)
    hybrid.set_gates(z)
    rows = torch.randint(1, 300, (1, 96), generator=torch.Generator().manual_seed(0))
    model(rows).logits.float().pow(2).mean().backward()
    hybrid.set_gates(None)
    return z.grad


def patched_forwards(model) -> int:
    return sum("forward" in m.__dict__ for m in model.modules())


def test_without_a_gpu_nothing_is_installed():
    model = tiny.build_model("llama", layers=2)
    assert not torch.cuda.is_available()
    assert fused_kernels.apply(model) == []
    assert patched_forwards(model) == 0


def test_installed_on_every_norm_and_mlp_and_cpu_tensors_still_run_transformers_code(monkeypatch):
    monkeypatch.setattr(fused_kernels, "available", lambda: True)
    for model_type, norms_per_layer in (("llama", 2), ("qwen3", 4)):  # Qwen3 also normalizes q and k
        model = tiny.build_model(model_type, layers=2)
        modeling = sys.modules[type(model).__module__]
        rope = modeling.apply_rotary_pos_emb
        expected = gate_gradient(model)

        assert fused_kernels.apply(model) == list(ALL)
        assert patched_forwards(model) == 2 * norms_per_layer + 1 + 2  # + the final norm, + one MLP per layer
        assert modeling.apply_rotary_pos_emb is not rope
        assert torch.equal(gate_gradient(model), expected)  # CPU tensors: transformers' code, bit for bit

        fused_kernels.remove(model)
        assert patched_forwards(model) == 0 and modeling.apply_rotary_pos_emb is rope
        assert torch.equal(gate_gradient(model), expected)


def test_the_search_installs_them_records_them_and_takes_them_off(monkeypatch, tmp_path):
    from consa.core.config import SearchConfig
    from consa.search.loop import run_search

    monkeypatch.setattr(fused_kernels, "available", lambda: True)
    model, tokenizer = tiny.build_model("llama", layers=2), tiny.build_tokenizer()
    rows = torch.randint(1, 300, (4, 64), generator=torch.Generator().manual_seed(0))
    seen = []
    config = SearchConfig(model="tiny", sparsity=0.5, seq_len=64, steps=2, window=16)
    result = run_search(config, model=model, tokenizer=tokenizer, dataset=rows,
                        progress=lambda record: seen.append(patched_forwards(model)))
    assert seen and all(n == 2 * 2 + 1 + 2 for n in seen)  # in place during the steps
    assert result.allocation.training["fused_kernels_used"] == list(ALL)
    assert patched_forwards(model) == 0

    off = run_search(SearchConfig(model="tiny", sparsity=0.5, seq_len=64, steps=2, window=16, fused_kernels="off"),
                     model=model, tokenizer=tokenizer, dataset=rows)
    assert off.allocation.training["fused_kernels_used"] == []


def test_the_estimate_counts_what_the_fused_kernels_keep():
    eager = memory.estimate_step(llama3_8b(), seq_len=32768, batch_size=1, free=123 * GIB)
    fused = memory.estimate_step(llama3_8b(), seq_len=32768, batch_size=1, free=123 * GIB, fused=ALL)
    # per token and layer: two fp32 norm inputs become bf16, SiLU's output is no longer kept
    assert eager.per_layer - fused.per_layer == (2 * 4096 * (4 - 2) + 14336 * 2) * 32768
    assert 0 < fused.plan()[0] < eager.plan()[0]  # 8B at 32k on one H200: fewer layers to recompute
