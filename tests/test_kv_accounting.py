"""The one KV-bytes formula: against hand counts, against what a live cache really stores, and the floor."""

import types

import pytest
import tiny
import torch
from transformers import DynamicCache

from consa.runtime.cache import HybridCache
from consa.core.units import exact_swa_mask
from consa.model.hybrid_attention import apply_allocation, model_shape
from consa.runtime.cache import cache_bytes
from consa.runtime.kv_accounting import floor_ratio, head_dim_of, kv_bytes, swa_tokens
from consa.core.manifest import Allocation
from consa.runtime.generation import cache_kwarg

WINDOW, SINKS = 8, 2
FULL = [[True, False], [False, True], [False, False], [True, True]]  # 4 layers x 2 KV heads: 4 FA, 4 SWA


@pytest.mark.parametrize("context,want", [(1, 1), (2, 2), (5, 5), (10, 10), (11, 10), (40, 10)])
def test_swa_tokens_are_sinks_then_the_window(context, want):
    assert swa_tokens(context, WINDOW, SINKS) == want
    assert swa_tokens(context, WINDOW) == min(context, WINDOW)


def stored_bytes(cache) -> int:
    """Bytes counted from the storage itself: FA heads hold every token written, SWA heads the slots
    whose position is set (not from the formula, so a wrong formula cannot agree with itself)."""
    total = 0
    for layer in cache.layers:
        B, _, _, d = layer.swa_k.shape  # (B, n_swa, S + W, d)
        held = len(layer.fa_idx) * layer.seen + len(layer.swa_idx) * int((layer.swa_pos >= 0).sum())
        total += 2 * B * d * layer.swa_k.element_size() * held
    return total


@pytest.mark.slow
def test_cache_holds_what_the_formula_says():
    """Prefill then decode at batch 2, past the sinks and the window: at every step the bytes the
    cache reports, the bytes its storage holds and kv_bytes for the allocation are the same."""
    model = tiny.build_model("qwen3")
    allocation = Allocation.from_full_mask(torch.tensor(FULL), model="qwen3", granularity="kv_head", window=WINDOW,
                                           sink_tokens=SINKS)
    apply_allocation(model, allocation)
    cache = HybridCache.for_model(model)
    kw = cache_kwarg(model)
    ids = torch.randint(1, 300, (2, 1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, **{kw: cache})
        for context in range(2, 30):
            model(input_ids=ids, use_cache=True, **{kw: cache})
            want = kv_bytes(allocation, model_shape(model), context, head_dim_of(model), element_size=4, batch_size=2)
            assert cache_bytes(cache) == stored_bytes(cache) == want["kv_bytes"], context
    # after 29 tokens: 4 FA heads x 29 + 4 SWA heads x (2 sinks + 8); K and V, 8 dims, 4 bytes, 2 rows
    assert want["kv_bytes"] == 2 * 2 * 8 * 4 * (4 * 29 + 4 * (SINKS + WINDOW))
    assert want["kv_bytes_full"] == 2 * 2 * 8 * 4 * 8 * 29


def test_stock_cache_of_full_attention_holds_kv_bytes_full():
    model = tiny.build_model("qwen3")
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.randint(1, 300, (1, 17)), use_cache=True, **{cache_kwarg(model): cache})
    assert cache_bytes(cache) == kv_bytes(None, model_shape(model), 17, head_dim_of(model), 4)["kv_bytes"]


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("context", [4, 64, 1000])
def test_floor_ratio_is_the_ratio_of_an_exact_allocation(sparsity, context):
    """An allocation with exactly s of its units SWA (no sinks) sits on the floor (1 - s) + s * min(W, L) / L."""
    swa = exact_swa_mask(torch.rand(16, generator=torch.Generator().manual_seed(1)), sparsity).view(4, 4)
    allocation = Allocation.from_full_mask(~swa, model="tiny", granularity="kv_head", window=WINDOW)
    ratio = kv_bytes(allocation, (4, 4), context, head_dim=8)["kv_bytes_ratio"]
    assert ratio == pytest.approx(floor_ratio(sparsity, WINDOW, context), abs=1e-12)
    assert floor_ratio(sparsity, WINDOW, context) == pytest.approx((1 - sparsity) + sparsity * min(WINDOW, context) / context)


def test_kv_bytes_refuses_an_allocation_of_another_shape():
    allocation = Allocation.from_full_mask(torch.tensor(FULL), model="tiny", granularity="kv_head", window=WINDOW)
    with pytest.raises(ValueError, match=r"\(4, 2\).*\(4, 4\)"):
        kv_bytes(allocation, (4, 4), 100, head_dim=8)


def test_head_dim_of_reads_the_config_or_splits_the_hidden_size():
    assert head_dim_of(tiny.build_model("qwen3")) == 8
    bare = types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=64, num_attention_heads=4, head_dim=None))
    assert head_dim_of(bare) == 16
