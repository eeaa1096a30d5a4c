"""Attention over a hybrid cache's storage in plain PyTorch: one query token against a cache
(`decode_attention`), a run of queries against a sliding window (`banded_attention`), and SDPA for
grouped-query heads (`grouped_sdpa`). consa.runtime.cache calls them; on CUDA one-token steps go through the
fused Triton kernel (consa.runtime.decode_kernel) instead, and fresh long prompts through FlexAttention.
`softcap` (Gemma 2's attention logit soft-capping) takes every one of them off SDPA onto an eager
softmax (consa.model.hybrid_attention.eager_attention).
"""

import torch
import torch.nn.functional as F

from consa.core.window import swa_visible
from consa.model.hybrid_attention import causal_keep, eager_attention

PREFILL_CHUNK = 1024  # queries per SDPA call for SWA heads in prefill: keys outside the window are skipped


def grouped_sdpa(q, k, v, mask=None, is_causal=False, scale=None, softcap=None):
    """q (B, Hq, q, d); k/v (B, Hk, kv, d) with Hq a multiple of Hk; mask bool broadcastable to (B, Hq, q, kv)."""
    if softcap is not None:
        if mask is None:
            mask = causal_keep(q.shape[2], k.shape[2], q.device) if is_causal else \
                torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device)
        return eager_attention(q, k, v, mask, scale, softcap)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        # Only flash/math kernels take enable_gqa; a masked call would fall back to math, so repeat K/V
        # (cheap: masked calls here cover a window or a chunk, never the whole context on every head).
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)


def decode_attention(q, k, v, valid=None, scale=None, softcap=None):
    """One query token against a cache. q (B, Hq, 1, d); k/v (B, Hk, T, d); valid (T,) bool or None.

    A plain matmul-softmax-matmul: each K/V byte is read once by a GEMM (bandwidth-bound, which is
    what decoding is), a validity mask costs T booleans, and nothing depends on a host-side length,
    so it can be captured in a CUDA graph over static storage.
    """
    B, Hq, _, d = q.shape
    Hk = k.shape[1]
    qg = q.reshape(B, Hk, Hq // Hk, d)  # (B, Hk, g, d): a GQA group shares its K/V
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * (scale if scale is not None else d ** -0.5)  # (B, Hk, g, T)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if valid is not None:
        scores = scores.masked_fill(~valid, float("-inf"))
    out = torch.matmul(scores.softmax(-1).to(v.dtype), v)  # (B, Hk, g, d)
    return out.view(B, Hq, 1, d)


def banded_attention(q, q0, span_k, span_v, k0, window, sink_k=None, sink_v=None, mask=None, scale=None,
                     chunk=PREFILL_CHUNK, softcap=None):
    """Sliding-window attention for a run of queries, skipping keys outside each chunk's window.

    q (B, Hq, q, d) at positions q0..q0+q-1; span_k/v (B, Hk, n, d) at contiguous positions k0..k0+n-1;
    sink_k/v (B, Hk, ns, d) at positions 0..ns-1 (all < k0). mask: optional padding mask (B, 1, q, P)
    over absolute key positions. A query at p sees p-window+1..p and every sink <= p.
    """
    B, Hq, q_len, d = q.shape
    ns = 0 if sink_k is None else sink_k.shape[2]
    out = q.new_empty(B, Hq, q_len, d)
    for a in range(0, q_len, chunk):
        b = min(q_len, a + chunk)
        q_pos = torch.arange(q0 + a, q0 + b, device=q.device)[:, None]  # (c, 1)
        lo = max(0, q0 + a - window + 1 - k0)  # span rows any query of the chunk can see
        hi = max(lo, q0 + b - k0)
        k_pos = torch.arange(k0 + lo, k0 + hi, device=q.device)[None, :]  # (1, n)
        keep = swa_visible(q_pos, k_pos, window)  # (c, n); the sinks come separately below
        keys, values = span_k[:, :, lo:hi], span_v[:, :, lo:hi]
        if ns:
            sink_pos = torch.arange(ns, device=q.device)[None, :]
            keep = torch.cat([swa_visible(q_pos, sink_pos, window, ns), keep], 1)
            keys, values = torch.cat([sink_k, keys], 2), torch.cat([sink_v, values], 2)
            k_pos = torch.cat([sink_pos, k_pos], 1)
        keep = keep[None, None]  # (1, 1, c, n)
        if mask is not None:
            keep = keep & mask[:, :, a:b, k_pos[0]]
        out[:, :, a:b] = grouped_sdpa(q[:, :, a:b], keys, values, keep, scale=scale, softcap=softcap)
    return out


__all__ = ["PREFILL_CHUNK", "grouped_sdpa", "decode_attention", "banded_attention"]
