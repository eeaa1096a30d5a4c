"""The memory estimate: as many layers are checkpointed as a step needs to fit, and checkpointing, whole
or partial, selective or not, leaves the gates' gradient unchanged."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoConfig

import tiny
from consa.search import memory
from consa.model.hybrid_attention import decoder_layers, install

GIB = 1 << 30


def llama3_8b():
    return AutoConfig.for_model("llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8)


def test_8b_at_128k_needs_checkpointing_on_one_h200_and_fits_with_it():
    est = memory.estimate_step(llama3_8b(), seq_len=131072, batch_size=1, act_bytes=2, free=123 * GIB)
    assert not est.fits(False)  # ~800 GiB of saved activations
    assert est.fits(True)
    assert est.peak(True) < est.peak(False) / 5


def test_estimate_errs_above_the_measured_8b_step():
    """Llama-3-8B, 8k tokens: ~36 GiB of activations measured (94 GiB peak minus weights and logits)."""
    est = memory.estimate_step(llama3_8b(), seq_len=8192, batch_size=1, act_bytes=2)
    assert 36 * GIB < est.activations < 72 * GIB


@pytest.mark.parametrize("free_gib,expected", [(0.001, 4), (1000, 0)])
def test_auto_checkpoints_every_layer_only_when_nothing_else_fits(monkeypatch, free_gib, expected):
    model = tiny.build_model()
    monkeypatch.setattr(memory, "free_bytes", lambda device: int(free_gib * GIB))
    chosen, keep, est = memory.checkpoint_plan("auto", model, seq_len=4096, batch_size=4, device="cpu")
    assert chosen == expected
    assert est.fits(False) is (expected == 0)
    assert keep is False  # nothing fits, or nothing is checkpointed


def test_auto_checkpoints_the_fewest_layers_that_fit_and_keeps_their_attention_where_it_fits():
    """8B at 32k on one H200: checkpointing every layer would leave most of the GPU idle."""
    est = memory.estimate_step(llama3_8b(), seq_len=32768, batch_size=1, act_bytes=2, free=120 * GIB)
    k, keep = est.plan()
    assert 0 < k < 32 and keep
    assert est.fits(k, True) and not est.fits(k - 1, True)
    assert est.peak(k, True) > est.peak(True, True)  # the memory it leaves unused buys back recomputation
    assert est.peak(True, True) > est.peak(True)  # the kept outputs are counted


def test_attention_is_not_kept_where_keeping_it_would_not_fit(monkeypatch):
    """8B at 128k: 2 GiB of attention outputs per layer do not fit next to the layer inputs."""
    est = memory.estimate_step(llama3_8b(), seq_len=131072, batch_size=1, act_bytes=2, free=123 * GIB)
    k, keep = est.plan()
    assert not keep and est.fits(k) and not est.fits(32, True)
    assert memory.estimate_step(llama3_8b(), seq_len=32768, batch_size=1, free=120 * GIB).plan()[1] is True
    assert memory.estimate_step(llama3_8b(), seq_len=32768, batch_size=1, free=120 * GIB).plan(
        keep_attention=False)[1] is False


def test_on_and_off_are_obeyed_whatever_the_estimate(monkeypatch):
    model = tiny.build_model()
    monkeypatch.setattr(memory, "free_bytes", lambda device: 1)
    assert memory.checkpoint_plan("off", model, 4096, 4, "cpu")[:2] == (0, False)
    monkeypatch.setattr(memory, "free_bytes", lambda device: 1 << 50)
    assert memory.checkpoint_plan("on", model, 4096, 4, "cpu")[:2] == (4, True)


class CountAttention(TorchDispatchMode):
    """Counts the attention kernels that actually run (not those SAC answers from its cache)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "scaled_dot_product" in str(func) and "backward" not in str(func):
            self.calls += 1
        return func(*args, **(kwargs or {}))


def _gate_grad(model, layers: int, keep_attention: bool):
    memory.enable_checkpointing(model, layers, keep_attention=keep_attention)
    model.train()
    hybrid = model.consa_hybrid
    z = torch.full((4, 2), 0.6, requires_grad=True)
    hybrid.set_gates(z)
    rows = torch.randint(1, 300, (2, 48), generator=torch.Generator().manual_seed(0))
    counter = CountAttention()
    with counter:
        loss = model(rows, labels=rows).loss
        loss.backward()
    hybrid.set_gates(None)
    return z.grad, counter.calls


def test_partial_and_selective_checkpointing_give_the_same_gradient_and_skip_recomputation():
    model = tiny.build_model(layers=4)
    for p in model.parameters():
        p.requires_grad_(False)
    install(model, window=8)
    reference, calls_plain = _gate_grad(model, 0, False)
    assert [b.gradient_checkpointing for b in decoder_layers(model)] == [False] * 4
    grad_all, calls_all = _gate_grad(model, 4, False)
    grad_two, calls_two = _gate_grad(model, 2, False)
    assert [b.gradient_checkpointing for b in decoder_layers(model)] == [True, True, False, False]
    grad_kept, calls_kept = _gate_grad(model, 4, True)
    for grad in (grad_all, grad_two, grad_kept):
        torch.testing.assert_close(grad, reference)
    # Each layer runs its attention twice per step (the FA and the SWA side on CPU's SDPA); a checkpointed
    # layer runs them again in the backward, unless its outputs are kept.
    assert (calls_plain, calls_all, calls_two, calls_kept) == (8, 16, 12, 8)
    assert len(model.get_input_embeddings()._forward_hooks) == 1  # one hook, however many searches enabled it


def test_unknown_free_memory_never_forces_checkpointing():
    est = memory.estimate_step(llama3_8b(), seq_len=131072, batch_size=1, free=None)
    assert est.fits(False)


@pytest.mark.parametrize("model_type", ["qwen3", "llama"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (8, 2), (6, 6)])
def test_the_estimate_matches_what_autograd_saves_per_layer(model_type, heads, kv_heads, bench_script):
    """Sum the bytes autograd keeps for the backward of a soft-gated step (storages counted once; the count
    bench/search_scale.py --mode saved makes on a GPU) and compare with the estimate for the same shape: within
    15% either way (too high costs recomputation, too low an out-of-memory step)."""
    model = tiny.build_model(model_type, layers=4, hidden_size=16 * heads, intermediate_size=320, num_attention_heads=heads,
                             num_key_value_heads=kv_heads, head_dim=16)
    for p in model.parameters():
        p.requires_grad_(False)
    tokens = 256
    per_layer, _ = bench_script("search_scale").saved_per_layer(model, tokens, "cpu")
    est = memory.estimate_step(model.config, seq_len=tokens, batch_size=1, act_bytes=4, qk_norm=model_type == "qwen3")
    assert 0.85 * est.per_layer <= per_layer <= 1.15 * est.per_layer, (per_layer, est.per_layer)
