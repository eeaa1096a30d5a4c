"""Oracle tests against transformers itself."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import tiny
from consa.core.errors import UnsupportedModelError
from consa.model.hybrid_attention import apply_allocation, install, uninstall
from consa.core.manifest import Allocation

FAMILIES = ["qwen3", "qwen2", "llama", "mistral"]
WINDOW = 8


def _tokens(seed=0, length=40, batch=2):
    return torch.randint(1, 300, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_all_full_gives_the_models_own_logits(family):
    model = tiny.build_model(family)
    x = _tokens()
    with torch.no_grad():
        ref = model(x).logits
        install(model, window=WINDOW)
        out = model(x).logits
    assert torch.equal(out, ref)


@pytest.mark.parametrize("family", ["qwen3", "qwen2", "mistral"])
def test_all_swa_equals_native_sliding_window(family):
    model = tiny.build_model(family)
    native_cfg = {"sliding_window": WINDOW}
    if family in ("qwen3", "qwen2"):
        native_cfg |= {"layer_types": ["sliding_attention"] * 4, "use_sliding_window": True, "max_window_layers": 0}
    native = tiny.build_model(family, **native_cfg)
    native.load_state_dict(model.state_dict())
    x = _tokens(length=48)
    install(model, window=WINDOW).set_gates(torch.zeros(4, 2))
    with torch.no_grad():
        ours, theirs, full = model(x).logits, native(x).logits, tiny.build_model(family)(x).logits
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert not torch.allclose(ours, full, atol=1e-3)  # the window really bites at this length


def test_layer_allocation_matches_native_layer_types():
    model = tiny.build_model("qwen3")
    types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    native = tiny.build_model("qwen3", layer_types=types, sliding_window=WINDOW, use_sliding_window=True)
    native.load_state_dict(model.state_dict())
    alloc = Allocation.from_full_mask(torch.tensor([[t == "full_attention"] * 2 for t in types]),
                                      model="tiny", granularity="layer", window=WINDOW)
    apply_allocation(model, alloc)
    x = _tokens(length=48)
    with torch.no_grad():
        assert torch.allclose(model(x).logits, native(x).logits, atol=1e-5)


def _attention_output(model, x, layer=0):
    """Input of layer `layer`'s o_proj: the per-head attention output, (B, T, H, d)."""
    seen = {}
    attn = model.model.layers[layer].self_attn
    handle = attn.o_proj.register_forward_hook(lambda m, inp, out: seen.setdefault("x", inp[0]))
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen["x"].view(x.shape[0], x.shape[1], attn.config.num_attention_heads, -1)


@pytest.mark.parametrize("family", FAMILIES)
def test_flipping_one_kv_head_changes_only_its_query_group(family):
    model = tiny.build_model(family)  # 4 query heads over 2 KV heads: groups {0,1} and {2,3}
    x = _tokens(length=32)
    hybrid = install(model, window=WINDOW)
    before = _attention_output(model, x)
    z = torch.ones(4, 2)
    z[0, 1] = 0  # layer 0, KV head 1 -> SWA
    hybrid.set_gates(z)
    after = _attention_output(model, x)
    assert torch.equal(before[:, :, :2], after[:, :, :2])
    assert not torch.allclose(before[:, WINDOW:, 2:], after[:, WINDOW:, 2:])
    # inside the window SWA sees the same keys as FA
    assert torch.allclose(before[:, :WINDOW, 2:], after[:, :WINDOW, 2:], atol=1e-6)


def test_soft_gates_mix_full_and_sliding_outputs():
    model = tiny.build_model("qwen3")
    x = _tokens(length=32)
    hybrid = install(model, window=WINDOW)
    full = _attention_output(model, x)
    hybrid.set_gates(torch.zeros(4, 2))
    swa = _attention_output(model, x)
    z = torch.full((4, 2), 0.3, requires_grad=True)
    hybrid.set_gates(z)
    mixed = _attention_output(model, x)
    assert torch.allclose(mixed, 0.3 * full + 0.7 * swa, atol=1e-6)


def test_gradient_reaches_the_gates_and_not_the_frozen_weights():
    model = tiny.build_model("qwen3")
    for p in model.parameters():
        p.requires_grad_(False)
    z = torch.full((4, 2), 0.5, requires_grad=True)
    install(model, window=WINDOW).set_gates(z)
    x = _tokens(length=32)
    model(input_ids=x, labels=x).loss.backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_sink_tokens_stay_visible():
    model = tiny.build_model("qwen3")
    x = _tokens(length=40)
    hybrid = install(model, window=WINDOW, sink_tokens=4)
    keep = hybrid.swa_keep(40, 40, "cpu")
    assert keep[39, :4].all() and not keep[39, 4:32].any() and keep[39, 32:].all()
    hybrid.set_gates(torch.zeros(4, 2))
    with_sinks = model(x).logits
    uninstall(model)
    install(model, window=WINDOW).set_gates(torch.zeros(4, 2))
    assert not torch.allclose(with_sinks, model(x).logits)


@pytest.mark.parametrize("model_type", ["qwen3", "gemma2"])
def test_padding_mask_is_respected(model_type):
    extra = dict(layer_types=["full_attention"] * 4, **GEMMA2) if model_type == "gemma2" else {}
    model = tiny.build_model(model_type, **extra)
    install(model, window=WINDOW).set_gates(torch.tensor([[1.0, 0.0]] * 4))
    x = _tokens(length=30, batch=1)
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), x], 1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 30, dtype=torch.long)], 1)
    with torch.no_grad():
        alone = model(x).logits[:, -1]
        left_padded = model(padded, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits[:, -1]
    torch.testing.assert_close(alone, left_padded, atol=1e-4, rtol=1e-4)


def test_model_without_attention_registry_is_refused():
    from transformers import BloomConfig

    bloom = AutoModelForCausalLM.from_config(BloomConfig(vocab_size=50, hidden_size=16, n_layer=2, n_head=2))
    with pytest.raises(UnsupportedModelError, match="attention registry"):
        install(bloom, window=4)


def test_allocation_shape_must_match_the_model():
    model = tiny.build_model("qwen3")
    alloc = Allocation.from_full_mask(torch.ones(3, 2, dtype=torch.bool), model="x", granularity="layer", window=4)
    with pytest.raises(ValueError, match="3 layers"):
        apply_allocation(model, alloc)


def test_bad_window_is_refused():
    with pytest.raises(ValueError, match="window"):
        install(tiny.build_model("qwen3"), window=0)


GEMMA2 = dict(query_pre_attn_scalar=8, attn_logit_softcapping=1.0, initializer_range=0.1)  # a cap that bites


@pytest.mark.parametrize("soft", [False, True])
def test_gemma2_soft_capped_swa_equals_its_own_sliding_layers(soft):
    """Gemma 2 soft-caps its logits (no SDPA): consa's SWA side, hard or soft gates, is transformers' eager
    sliding attention with the cap."""
    model = tiny.build_model("gemma2", layer_types=["full_attention"] * 4, **GEMMA2)
    native = tiny.build_model("gemma2", layer_types=["sliding_attention"] * 4, sliding_window=WINDOW, **GEMMA2)
    uncapped = tiny.build_model("gemma2", layer_types=["sliding_attention"] * 4, sliding_window=WINDOW,
                                **{**GEMMA2, "attn_logit_softcapping": None})
    assert model.config._attn_implementation == native.config._attn_implementation == "eager"
    x = _tokens(length=32)
    install(model, window=WINDOW).set_gates(torch.zeros(4, 2, requires_grad=soft))
    with torch.no_grad():
        ours, theirs = model(x).logits, native(x).logits
        assert (theirs - uncapped(x).logits).abs().max() > 1e-2  # the cap acts
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("window,sinks", [(16, 0), (16, 2), (64, 0)])
def test_flex_soft_cap_equals_eager(window, sinks):
    """The score_mod FlexAttention gets for Gemma 2 (run uncompiled here; the GPU compiles the same function)."""
    from consa.core.window import swa_visible
    from consa.model.hybrid_attention import eager_attention, flex_sliding_window

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, 64, 8, generator=g) * 3 for n in (4, 2, 2))
    pos = torch.arange(64)
    keep = swa_visible(pos[:, None], pos[None, :], window, sinks)
    out = flex_sliding_window(q, k, v, window, sinks, scaling=0.3, compile=False, softcap=2.0)
    torch.testing.assert_close(out, eager_attention(q, k, v, keep, 0.3, 2.0), atol=1e-5, rtol=1e-4)
    assert (out - eager_attention(q, k, v, keep, 0.3, None)).abs().max() > 1e-2
