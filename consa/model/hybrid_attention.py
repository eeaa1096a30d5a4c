"""Hybrid full/sliding attention, swapped in through transformers' attention-function registry.

One function, registered under ATTN_NAME, serves every decoder that calls its attention through
the registry (Qwen3, Qwen2, Llama, Mistral, ...). Each attention module carries a reference to a
`HybridAttention` that holds gate values z of shape (num_layers, num_kv_heads); the function
reads the row of `module.layer_idx` and mixes, per KV head and its GQA query group:

    out = z * FA(q, k, v) + (1 - z) * SWA(q, k, v)

With hard gates (every z is 0 or 1) only one of the two is computed per head.

Families that soft-cap their attention logits (Gemma 2: `softcap` arrives in the kwargs) cannot use
SDPA: both sides then run `eager_attention` (transformers' eager order of operations, so full
attention gives the stock model's logits exactly), or FlexAttention with a soft-capping score_mod
where the SWA kernels would run (CUDA, no padding, long prefill).
"""

import functools
import warnings
from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from consa.core.config import BACKENDS
from consa.core.errors import UnsupportedModelError
from consa.core.window import swa_visible

ATTN_NAME = "consa_hybrid"


class HybridAttention:
    """Per-model state read by the registered attention function."""

    def __init__(self, num_layers: int, num_kv_heads: int, window: int, sink_tokens: int = 0, backend: str = "auto"):
        if window <= 0:
            raise ValueError(f"window must be a positive number of tokens, got {window}")
        if sink_tokens < 0:
            raise ValueError(f"sink_tokens must be >= 0, got {sink_tokens}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}: expected one of {', '.join(BACKENDS)}")
        self.num_layers, self.num_kv_heads = num_layers, num_kv_heads
        self.window, self.sink_tokens, self.backend = window, sink_tokens, backend
        self.set_gates(None)  # z: (L, K) in [0, 1]; None means every unit is full attention

    def set_gates(self, z: torch.Tensor | None) -> None:
        """z: (num_layers, num_kv_heads), 1 = full, 0 = SWA; may carry gradient."""
        if z is not None and tuple(z.shape) != (self.num_layers, self.num_kv_heads):
            raise ValueError(f"gates must be shaped {(self.num_layers, self.num_kv_heads)}, got {tuple(z.shape)}")
        self.z = z
        # Per layer: every unit full, every unit SWA, every unit one or the other. Read on the host once
        # per set of gates, not in every layer's forward, where each read makes the CPU wait for the GPU.
        self.all_full = self.all_swa = self.all_hard = None
        if z is not None:
            z = z.detach()
            flags = torch.stack([(z == 1).all(1), (z == 0).all(1), ((z == 0) | (z == 1)).all(1)]).tolist()
            self.all_full, self.all_swa, self.all_hard = flags

    def set_allocation(self, allocation) -> None:
        self.set_gates(allocation.full_mask().float())

    # -- masks ---------------------------------------------------------------------------------
    def swa_keep(self, q_len: int, kv_len: int, device) -> torch.Tensor:
        """(q_len, kv_len) bool: inside the window (or a sink) and causal.

        Queries are the last q_len of kv_len positions: the cache holds every past token here
        (the runtime's ring buffer handles eviction itself).
        """
        q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
        k_pos = torch.arange(kv_len, device=device)[None, :]
        return swa_visible(q_pos, k_pos, self.window, self.sink_tokens)



# -- FlexAttention: SWA that skips the key blocks outside the window ---------------------------------
_block_masks = {}
_compiled_flex = None


def swa_block_mask(q_len: int, kv_len: int, window: int, sink_tokens: int, device):
    """A BlockMask for sliding-window causal attention; queries are the last q_len of kv_len positions."""
    key = (q_len, kv_len, window, sink_tokens, str(device))
    if key not in _block_masks:
        from torch.nn.attention.flex_attention import create_block_mask

        offset = kv_len - q_len

        def swa_mod(b, h, q_idx, kv_idx):
            q_pos = q_idx + offset
            return swa_visible(q_pos, kv_idx, window, sink_tokens)

        # _compile: built block by block; eager evaluates mask_mod on the dense (q, kv) grid (128 GiB at 128k).
        _block_masks[key] = create_block_mask(swa_mod, None, None, q_len, kv_len, device=device,
                                              _compile=str(device).startswith("cuda"))
    return _block_masks[key]


@functools.cache
def _softcap_score_mod(softcap: float):
    """FlexAttention's score_mod for logit soft-capping (the score arrives already scaled)."""
    def score_mod(score, b, h, q_idx, kv_idx):
        return torch.tanh(score / softcap) * softcap

    return score_mod


def flex_sliding_window(query, key, value, window: int, sink_tokens: int = 0, scaling=None, compile: bool = True,
                        softcap: float | None = None):
    """query (B, H, q, d), key/value (B, K, kv, d) -> (B, H, q, d): one kernel, window blocks only.
    softcap: soft-cap the scaled logits (Gemma 2)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    attend = flex_attention
    if compile:
        if _compiled_flex is None:
            # One compile per (heads, length) shape: a kv_head allocation has a different SWA head
            # count per layer, and evaluating many allocations must not hit dynamo's default limit of 8.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        attend = _compiled_flex
    block_mask = swa_block_mask(query.shape[2], key.shape[2], window, sink_tokens, query.device)
    gqa = query.shape[1] != key.shape[1]
    score_mod = None if softcap is None else _softcap_score_mod(float(softcap))
    return attend(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scaling, enable_gqa=gqa)


def _flex_swa(hybrid, module, query, key, value, scaling, softcap=None):
    out = flex_sliding_window(query, key, value, hybrid.window, hybrid.sink_tokens, scaling, softcap=softcap)
    return out.transpose(1, 2).contiguous()  # (B, q, H, d)


def _flash_swa(hybrid, query, key, value, scaling, softcap=None):
    from flash_attn import flash_attn_func  # optional extra `gpu`; never imported otherwise

    # flash-attn wants (B, T, H, d); window_size=(left, right) counts tokens before the query.
    capped = {} if softcap is None else {"softcap": softcap}  # flash-attn >= 2.6
    out = flash_attn_func(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
        softmax_scale=scaling, causal=True, window_size=(hybrid.window - 1, 0), **capped,
    )
    return out


# -- eager attention: logit soft-capping (Gemma 2), which SDPA cannot do ------------------------------
def causal_keep(q_len: int, kv_len: int, device) -> torch.Tensor:
    """(q_len, kv_len) bool causal mask; queries are the last q_len of kv_len positions."""
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    return torch.arange(kv_len, device=device)[None, :] <= q_pos


def eager_attention(query, key, value, mask=None, scaling=None, softcap=None, dropout: float = 0.0):
    """query (B, H, q, d), key/value (B, K, kv, d) -> (B, H, q, d), as transformers' eager kernel computes it:
    scores * scaling, softcap * tanh(scores / softcap), plus the mask, softmax in fp32, cast back.

    mask: bool (True = attend) or additive float, broadcastable to (B, H, q, kv); None = causal.
    """
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # transformers' repeat_kv: each KV head next to its query group
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scores = torch.matmul(query, key.transpose(2, 3)) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        mask = causal_keep(query.shape[2], key.shape[2], query.device)
    if mask.dtype == torch.bool:  # the additive mask transformers' eager_mask builds from it
        mask = torch.zeros(mask.shape, dtype=scores.dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(scores.dtype).min)
    scores = scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if dropout:
        probs = torch.nn.functional.dropout(probs, p=dropout, training=True)
    return torch.matmul(probs, value)


def _softcap_full(hybrid, module, query, key, value, attention_mask, scaling, softcap, dropout):
    """Full attention with soft-capped logits; returns (B, q, H, d)."""
    if hybrid is not None and not dropout and _use_kernel(hybrid, query, key, attention_mask, "flex") \
            and query.shape[2] == key.shape[2]:
        try:  # a causal block mask: the window spans the whole sequence
            out = flex_sliding_window(query, key, value, key.shape[2], 0, scaling, softcap=softcap)
            return out.transpose(1, 2).contiguous()
        except Exception as e:
            warnings.warn(f"FlexAttention failed ({type(e).__name__}: {e}); using eager attention instead")
            hybrid.backend = "sdpa"
    return eager_attention(query, key, value, attention_mask, scaling, softcap, dropout).transpose(1, 2).contiguous()


@functools.cache
def _has_flash_attn() -> bool:
    """Asked once: looking a module up on sys.path takes ~60 us, and the SWA side asks in every layer."""
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def _use_kernel(hybrid, query, key, attention_mask, name) -> bool:
    """Kernel backends cover the common case only: CUDA, no padding mask, no sinks, prefill."""
    if not query.is_cuda or attention_mask is not None or hybrid.sink_tokens:
        return False
    if hybrid.backend == name:
        return True
    if hybrid.backend != "auto":
        return False
    if name == "flash":
        return _has_flash_attn()
    return name == "flex" and query.shape[2] == key.shape[2] and query.shape[2] >= 1024


def _swa_attention(hybrid, module, query, key, value, attention_mask, scaling, softcap=None, **kwargs):
    """Sliding-window attention for the given heads; returns (B, q, H, d)."""
    if _use_kernel(hybrid, query, key, attention_mask, "flash"):
        return _flash_swa(hybrid, query, key, value, scaling, softcap)
    if _use_kernel(hybrid, query, key, attention_mask, "flex"):
        try:
            return _flex_swa(hybrid, module, query, key, value, scaling, softcap)
        except Exception as e:  # a compile failure must not kill an hours-long job: fall back, say so
            warnings.warn(f"FlexAttention failed ({type(e).__name__}: {e}); using SDPA with masks instead")
            hybrid.backend = "sdpa"
    q_len, kv_len = query.shape[2], key.shape[2]
    keep = hybrid.swa_keep(q_len, kv_len, query.device)[None, None]  # (1, 1, q, kv)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            keep = keep & attention_mask[..., -kv_len:]
        else:  # additive float mask
            keep = keep & (attention_mask[..., -kv_len:] == 0)
    if softcap is not None:
        dropout = kwargs.get("dropout", 0.0)
        return eager_attention(query, key, value, keep, scaling, softcap, dropout).transpose(1, 2).contiguous()
    out, _ = sdpa_attention_forward(module, query, key, value, keep, scaling=scaling, **kwargs)
    return out


def _select_heads(module, query, key, value, kv_heads: torch.Tensor):
    """The query heads of the chosen KV heads (GQA groups stay together)."""
    groups = query.shape[1] // key.shape[1]
    q_heads = (kv_heads[:, None] * groups + torch.arange(groups, device=kv_heads.device)).flatten()
    return query[:, q_heads], key[:, kv_heads], value[:, kv_heads], q_heads


def hybrid_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """query (B, H, q, d); key/value (B, K, kv, d), KV heads not yet repeated. Returns (B, q, H, d)."""
    if hasattr(key, "hybrid_attend"):
        # A consa.runtime.cache layer stands in for key/value: it stores FA and SWA heads apart
        # (SWA heads only their window) and computes the attention over its own storage.
        return key.hybrid_attend(module, query, attention_mask, scaling=scaling, softcap=kwargs.get("softcap")), None
    kwargs.pop("sliding_window", None)  # the window comes from the allocation, not the config
    kwargs.pop("is_causal", None)
    softcap = kwargs.pop("softcap", None)  # Gemma 2's attention logit soft-capping: no SDPA
    hybrid = getattr(module, "consa_hybrid", None)
    z = None if hybrid is None or hybrid.z is None else hybrid.z[module.layer_idx]  # (K,)
    if softcap is None:
        full = lambda q, k, v: sdpa_attention_forward(module, q, k, v, attention_mask, dropout=dropout, scaling=scaling, **kwargs)[0]  # noqa: E731
    else:
        full = lambda q, k, v: _softcap_full(hybrid, module, q, k, v, attention_mask, scaling, softcap, dropout)  # noqa: E731
    swa = lambda q, k, v: _swa_attention(hybrid, module, q, k, v, attention_mask, scaling, softcap, dropout=dropout, **kwargs)  # noqa: E731

    layer = module.layer_idx
    if z is None or hybrid.all_full[layer]:
        return full(query, key, value), None
    if hybrid.all_swa[layer] and not z.requires_grad:
        return swa(query, key, value), None

    groups = query.shape[1] // key.shape[1]
    if not z.requires_grad and hybrid.all_hard[layer]:
        # Split the heads into an FA part and an SWA part: each head is computed once.
        out = query.new_empty(query.shape[0], query.shape[2], query.shape[1], value.shape[-1])  # (B, q, H, d)
        for heads_wanted, attend in ((z == 1, full), (z == 0, swa)):
            kv_heads = heads_wanted.nonzero().flatten()
            q_sub, k_sub, v_sub, q_heads = _select_heads(module, query, key, value, kv_heads)
            out[:, :, q_heads] = attend(q_sub, k_sub, v_sub).to(out.dtype)
        return out, None

    # Soft gates (the search): both paths on every head, mixed per query group. Written as
    # swa + z * (full - swa), autograd keeps one difference, not both outputs.
    z_q = z.repeat_interleave(groups).to(query.dtype)[None, None, :, None]  # (1, 1, H, 1)
    out_swa = swa(query, key, value)
    return out_swa + z_q * (full(query, key, value) - out_swa), None


_registered = False


def register() -> None:
    """Register the function and its mask builder (without the mask, causal masking is lost)."""
    global _registered
    if not _registered:
        AttentionInterface.register(ATTN_NAME, hybrid_attention_forward)
        AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
        _registered = True


# -- installing into a model ---------------------------------------------------------------------
def attention_modules(model) -> list:
    """The self-attention modules, in layer order, found by their `layer_idx`."""
    found = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "layer_idx") and type(mod).__name__.endswith("Attention") and hasattr(mod, "config"):
            found.setdefault(mod.layer_idx, mod)
    return [found[i] for i in sorted(found)]


def model_shape(model) -> tuple[int, int]:
    """(num_layers, num_kv_heads) of a decoder, or an UnsupportedModelError saying what is missing."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layers = getattr(cfg, "num_hidden_layers", None)
    heads = getattr(cfg, "num_key_value_heads", None) or getattr(cfg, "num_attention_heads", None)
    if not layers or not heads:
        raise UnsupportedModelError(
            f"model type {cfg.model_type!r} does not expose num_hidden_layers / num_key_value_heads"
        )
    return int(layers), int(heads)


def install(model, window: int, sink_tokens: int = 0, backend: str = "auto") -> HybridAttention:
    """Swap the model's attention for the hybrid function; every unit starts as full attention."""
    if not getattr(type(model), "_supports_attention_backend", False):
        raise UnsupportedModelError(
            f"{type(model).__name__} does not route attention through transformers' attention registry, "
            "so consa cannot swap its attention (supported: Qwen3, Qwen2, Llama, Mistral and other "
            "registry-based decoders)"
        )
    num_layers, num_kv_heads = model_shape(model)
    modules = attention_modules(model)
    if len(modules) != num_layers:
        raise UnsupportedModelError(
            f"found {len(modules)} attention modules with a layer_idx, expected {num_layers}: "
            f"{type(model).__name__} is not a plain decoder consa can swap"
        )
    register()
    hybrid = HybridAttention(num_layers, num_kv_heads, window, sink_tokens, backend)
    for mod in modules:
        mod.consa_hybrid = hybrid
    model.consa_previous_attn = model.config._attn_implementation
    model.set_attn_implementation(ATTN_NAME)
    model.consa_hybrid = hybrid
    return hybrid


def uninstall(model) -> None:
    for mod in attention_modules(model):
        mod.consa_hybrid = None
    model.set_attn_implementation(getattr(model, "consa_previous_attn", None) or "sdpa")
    model.consa_hybrid = None


def apply_allocation(model, allocation, backend: str = "auto") -> HybridAttention:
    """Install hard gates from an allocation (evaluation, export checks, serving)."""
    num_layers, num_kv_heads = model_shape(model)
    if (allocation.num_layers, allocation.num_kv_heads) != (num_layers, num_kv_heads):
        raise ValueError(
            f"allocation is for {allocation.num_layers} layers x {allocation.num_kv_heads} KV heads, "
            f"the model has {num_layers} x {num_kv_heads}"
        )
    hybrid = getattr(model, "consa_hybrid", None)
    if hybrid is None or hybrid.window != allocation.window or hybrid.sink_tokens != allocation.sink_tokens:
        hybrid = install(model, allocation.window, allocation.sink_tokens, backend)
    hybrid.set_allocation(allocation)
    return hybrid


def decoder_layers(model) -> list:
    """The repeated blocks transformers checkpoints (GradientCheckpointingLayer), bottom first."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


@contextmanager
def allocation_applied(model, allocation, backend: str = "auto"):
    """The model under `allocation`'s hard gates (None: the unmodified model) inside the block, and every
    unit full attention again after it, whatever happens in between."""
    hybrid = getattr(model, "consa_hybrid", None)
    try:
        if allocation is not None:
            hybrid = apply_allocation(model, allocation, backend)
        elif hybrid is not None:
            hybrid.set_gates(None)
        yield hybrid
    finally:
        if hybrid is not None:
            hybrid.set_gates(None)
