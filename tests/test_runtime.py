"""The hybrid KV cache: same tokens as the hybrid attention without eviction, and the bytes the allocation says."""

import pytest
import tiny
import torch

from consa.runtime.attention_kernels import banded_attention, decode_attention
from consa.runtime.cache import HybridCache
from consa.model.head_grouping import group_heads
from consa.model.hybrid_attention import apply_allocation, model_shape
from consa.runtime.cache import cache_bytes
from consa.runtime.kv_accounting import kv_bytes
from consa.core.manifest import Allocation
from consa.runtime.generation import cache_kwarg, output_cache

WINDOW = 8


def allocation_for(model, pattern, window=WINDOW, sink_tokens=0, granularity="kv_head"):
    full = torch.tensor(pattern, dtype=torch.bool)
    return Allocation.from_full_mask(full, model=model.config.model_type, granularity=granularity,
                                     window=window, sink_tokens=sink_tokens)


def greedy_recompute(model, prompt, steps):
    """Reference: the whole sequence through the hybrid attention every step, no cache at all.
    Returns (ids (1, T + steps), next-token logits (steps, V))."""
    ids, logits = prompt, []
    for _ in range(steps):
        logits.append(model(input_ids=ids, use_cache=False).logits[:, -1])
        ids = torch.cat([ids, logits[-1].argmax(-1, keepdim=True)], 1)
    return ids, torch.cat(logits)


def greedy_cached(model, prompt, steps, cache):
    """The same greedy loop through forward() with the hybrid cache (prefill, then one token at a time)."""
    kw = cache_kwarg(model)
    out = model(input_ids=prompt, use_cache=True, **{kw: cache})
    ids, logits = prompt, [out.logits[:, -1]]
    for _ in range(steps - 1):
        ids = torch.cat([ids, logits[-1].argmax(-1, keepdim=True)], 1)
        out = model(input_ids=ids[:, -1:], use_cache=True, **{kw: output_cache(out)})
        logits.append(out.logits[:, -1])
    ids = torch.cat([ids, logits[-1].argmax(-1, keepdim=True)], 1)
    return ids, torch.cat(logits)


PATTERNS = {  # 4 layers x 2 KV heads, True = full
    "kv_head": [[True, False], [False, True], [False, False], [True, True]],
    "layer": [[True, True], [False, False], [True, True], [False, False]],
}


@pytest.mark.parametrize("model_type,granularity,sinks", [
    ("qwen3", "kv_head", 0), ("qwen3", "kv_head", 2), ("llama", "kv_head", 0), ("qwen2", "layer", 0)])
@pytest.mark.slow
def test_cached_greedy_matches_recompute(model_type, granularity, sinks):
    model = tiny.build_model(model_type)
    allocation = allocation_for(model, PATTERNS[granularity], sink_tokens=sinks, granularity=granularity)
    apply_allocation(model, allocation)
    prompt = torch.randint(1, 300, (1, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, want_logits = greedy_recompute(model, prompt, 20)  # 33 tokens: well past the window of 8
        got, got_logits = greedy_cached(model, prompt, 20, HybridCache.for_model(model))
        model.consa_hybrid.set_gates(None)
        _, full_logits = greedy_recompute(model, prompt, 20)
    assert torch.equal(got, want)
    torch.testing.assert_close(got_logits, want_logits, atol=1e-5, rtol=1e-4)
    # the SWA heads change the logits far more than the tolerance, so the match means something
    assert (full_logits - want_logits).abs().max() > 1e-3


def test_generate_uses_hybrid_cache_and_matches():
    model = tiny.build_model("qwen3")
    allocation = allocation_for(model, PATTERNS["kv_head"], sink_tokens=1)
    apply_allocation(model, allocation)
    prompt = torch.randint(1, 300, (1, 11), generator=torch.Generator().manual_seed(2))
    cache = HybridCache.for_model(model)
    with torch.no_grad():
        want, _ = greedy_recompute(model, prompt, 16)
        got = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False,
                             min_new_tokens=16, **{cache_kwarg(model): cache})
    assert torch.equal(got, want)
    assert cache.get_seq_length() == prompt.shape[1] + 16 - 1  # the last token is never fed back


def test_chunked_prefill_matches_one_shot():
    """A prompt fed in pieces (q > 1 with a non-empty cache) gives the same logits as one forward."""
    model = tiny.build_model("qwen3")
    apply_allocation(model, allocation_for(model, PATTERNS["kv_head"], sink_tokens=2))
    ids = torch.randint(1, 300, (1, 30), generator=torch.Generator().manual_seed(3))
    kw = cache_kwarg(model)
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
        cache = HybridCache.for_model(model)
        parts = [model(input_ids=ids[:, a:b], use_cache=True, **{kw: cache}).logits
                 for a, b in ((0, 5), (5, 17), (17, 18), (18, 30))]
    torch.testing.assert_close(torch.cat(parts, 1), want, atol=1e-5, rtol=1e-4)


def test_cache_bytes_match_allocation():
    model = tiny.build_model("qwen3")
    allocation = allocation_for(model, PATTERNS["kv_head"], sink_tokens=2)
    apply_allocation(model, allocation)
    context = 40
    cache = HybridCache.for_model(model)
    with torch.no_grad():
        model(input_ids=torch.randint(1, 300, (1, context)), use_cache=True, **{cache_kwarg(model): cache})
    head_dim = model.config.head_dim
    want = kv_bytes(allocation, model_shape(model), context, head_dim, torch.float32.itemsize)["kv_bytes"]
    assert cache_bytes(cache) == want
    # 4 FA heads hold 40 tokens, 4 SWA heads hold 2 sinks + 8; K and V, 8 dims, 4 bytes
    assert want == 2 * 8 * 4 * (4 * 40 + 4 * (2 + WINDOW))
    # SWA storage really is window-sized: reserved bytes of SWA heads do not grow with the context
    layer = cache.layers[2]  # all SWA
    assert layer.swa_k.shape[2] == 2 + WINDOW and layer.fa_k.shape[1] == 0


def test_banded_attention_matches_dense_mask():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 50, 8), torch.randn(1, 2, 50, 8), torch.randn(1, 2, 50, 8)
    window, sinks = 7, 3
    pos = torch.arange(50)
    keep = (pos[None] <= pos[:, None]) & ((pos[None] > pos[:, None] - window) | (pos[None] < sinks))
    want = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                            attn_mask=keep)
    got = banded_attention(q, 0, k[:, :, sinks:], v[:, :, sinks:], sinks, window, k[:, :, :sinks], v[:, :, :sinks],
                           chunk=16)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_decode_attention_matches_sdpa():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 20, 8), torch.randn(2, 2, 20, 8)
    valid = torch.arange(20) < 13
    want = torch.nn.functional.scaled_dot_product_attention(q, k[:, :, :13].repeat_interleave(2, 1),
                                                            v[:, :, :13].repeat_interleave(2, 1))
    torch.testing.assert_close(decode_attention(q, k, v, valid), want, atol=1e-5, rtol=1e-5)


def test_benchmark_main_runs_tiny(tmp_path, bench_script):
    """bench/runtime.py end to end on a tiny model: records with bytes at the floor."""
    import json

    bench = bench_script("runtime")
    records = bench.main(["--tiny", "--device", "cpu", "--contexts", "96", "--sparsities", "0.5", "--decode-steps", "3",
                          "--window", "16", "--extra-batches", "--out", str(tmp_path)])
    assert {(r["granularity"], r["sparsity"]) for r in records} == {("full", 0.0), ("kv_head", 0.5), ("layer", 0.5)}
    for r in records:
        assert abs(r["kv_bytes_ratio"] - r["floor_ratio"]) < 1e-9
    saved = json.loads((tmp_path / "runtime.json").read_text())["records"]
    assert saved[0].keys() >= {"model", "granularity", "sparsity", "context", "kv_bytes_ratio", "floor_ratio",
                               "prefill_speedup", "decode_speedup"}


def test_group_heads_keeps_the_function():
    model = tiny.build_model("qwen3")
    alloc = allocation_for(model, PATTERNS["kv_head"])
    ids = torch.randint(1, 300, (1, 20), generator=torch.Generator().manual_seed(4))
    apply_allocation(model, alloc)
    with torch.no_grad():
        want = model(input_ids=ids).logits
        grouped = group_heads(model, alloc)
        apply_allocation(model, grouped)
        got = model(input_ids=ids).logits
        _, cached = greedy_cached(model, ids, 12, HybridCache.for_model(model))
        _, ref = greedy_recompute(model, ids, 12)
    assert grouped.assignment[1] == ["full", "swa"] and grouped.sparsity_achieved == alloc.sparsity_achieved
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cached, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("length", [100, 1024, 2500])
def test_decode_attention_matches_masked_sdpa(length):
    """Decode attention over a cache with invalid slots equals plain masked attention."""
    g = torch.Generator().manual_seed(length)
    q, k, v = torch.randn(2, 8, 1, 16, generator=g), torch.randn(2, 4, length, 16, generator=g), torch.randn(2, 4, length, 16, generator=g)
    valid = torch.arange(length) < length - 7
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                           attn_mask=valid[None, None, None, :])
    assert torch.allclose(decode_attention(q, k, v, valid), ref, atol=1e-5)


@pytest.mark.parametrize("sinks", [0, 4])
def test_flex_prefill_matches_the_banded_path(sinks):
    """The GPU prefill path (FlexAttention block mask) computes what the chunked SDPA path does."""
    import warnings

    from consa.model.hybrid_attention import flex_sliding_window

    g = torch.Generator().manual_seed(sinks)
    q, k, v = torch.randn(1, 4, 300, 16, generator=g), torch.randn(1, 2, 300, 16, generator=g), torch.randn(1, 2, 300, 16, generator=g)
    ref = banded_attention(q, 0, k[:, :, sinks:], v[:, :, sinks:], sinks, 50, k[:, :, :sinks] if sinks else None,
                           v[:, :, :sinks] if sinks else None, None, None, chunk=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # uncompiled flex on the CPU warns that it is slow
        out = flex_sliding_window(q, k, v, 50, sinks, None, compile=False)
    assert torch.allclose(out, ref, atol=1e-5)


def test_compiled_layers_decode_like_eager_layers():
    """compile_layers leaves the cache and attention outside the graphs: the same tokens and logits
    (Dynamo's tracing with the eager backend; inductor only changes the kernels)."""
    from consa.runtime.generation import compile_layers

    model = tiny.build_model("qwen3")
    apply_allocation(model, allocation_for(model, PATTERNS["kv_head"]))
    ids = torch.randint(1, 300, (1, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want_ids, want_logits = greedy_cached(model, ids, 8, HybridCache.for_model(model))
        compile_layers(model, backend="eager")
        try:
            got_ids, got_logits = greedy_cached(model, ids, 8, HybridCache.for_model(model))
        finally:
            compile_layers(model, enable=False)
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(got_logits, want_logits)
    assert all(layer._compiled_call_impl is None for layer in model.get_decoder().layers)
