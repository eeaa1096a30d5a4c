"""A per-unit KV cache: full-attention (FA) heads keep every token, sliding-window
(SWA) heads keep only their sink tokens and the last W tokens, so the cache really shrinks.

`HybridCache` is a transformers `Cache` with one `HybridCacheLayer` per decoder layer. A layer
stores its FA heads and its SWA heads in separate tensors:

    fa_k, fa_v    (B, n_fa, capacity, d)   grows with the context (capacity doubles, or is static)
    swa_k, swa_v  (B, n_swa, S + W, d)     slots [0, S) hold the sinks, [S, S + W) a ring buffer
    swa_pos       (S + W,)                 absolute position held by each slot, -1 = empty

`update()` returns the layer itself instead of key/value tensors; consa's registered attention
function sees that (`hybrid_attend`) and lets the layer compute attention over its own storage:
FA heads over the whole context, SWA heads over their window only, so decoding reads W tokens per
SWA head instead of the whole context. One-token steps on CUDA run `consa.runtime.decode_kernel`: one launch
stores the token and attends over both kinds of head, split over the context so the GPU is busy;
other steps use the plain-PyTorch kernels of consa.runtime.attention_kernels.

Layer-granularity checkpoints exported with `layer_types` need none of this: a stock
`DynamicCache(config=...)` already keeps sliding layers short. `make_cache` picks the right one;
consa.runtime.generation runs a model with it, consa.runtime.kv_accounting counts its bytes.
"""

import functools

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache

from consa.runtime import decode_kernel
from consa.runtime.attention_kernels import PREFILL_CHUNK, banded_attention, decode_attention, grouped_sdpa
from consa.model.hybrid_attention import flex_sliding_window
from consa.runtime.kv_accounting import held_bytes, swa_tokens, token_bytes


def _as_bool_mask(mask):
    """HF masks are bool (True = attend) or additive floats (0 = attend)."""
    if mask is None or mask.dtype == torch.bool:
        return mask
    return mask == 0


def _to(sel, device):
    return sel.to(device) if isinstance(sel, torch.Tensor) else sel


def _heads(idx: list[int]):
    """A slice when the heads are contiguous (a view, no copy), else an index tensor."""
    if idx and idx == list(range(idx[0], idx[-1] + 1)):
        return slice(idx[0], idx[-1] + 1)
    return torch.tensor(idx, dtype=torch.long)


class HybridCacheLayer(CacheLayerMixin):
    """One decoder layer's cache with FA heads and SWA heads stored apart (see module docstring)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, full_heads: list[bool], window: int, sink_tokens: int = 0, max_length: int | None = None):
        super().__init__()
        self.window, self.sinks, self.max_length = window, sink_tokens, max_length
        self.fa_idx = [h for h, f in enumerate(full_heads) if f]
        self.swa_idx = [h for h, f in enumerate(full_heads) if not f]
        self.num_kv_heads = len(full_heads)
        self.seen = 0  # tokens written so far (host-side; graph decoding uses `graph_position`)
        self.graph = None  # dict shared by all layers while decoding inside a CUDA graph (HybridCache.set_graph_position)
        self.softcap = None  # the attention logit soft-cap of the current call (Gemma 2)
        self.fa_k = self.fa_v = self.swa_k = self.swa_v = self.swa_pos = None

    # -- storage ------------------------------------------------------------------------------------
    def lazy_initialization(self, key_states, value_states):
        B, _, _, d = key_states.shape
        self.device, self.dtype = key_states.device, key_states.dtype
        new = functools.partial(torch.zeros, dtype=self.dtype, device=self.device)
        capacity = self.max_length or 256
        self.fa_k, self.fa_v = new(B, len(self.fa_idx), capacity, d), new(B, len(self.fa_idx), capacity, d)
        slots = self.sinks + self.window
        self.swa_k, self.swa_v = new(B, len(self.swa_idx), slots, d), new(B, len(self.swa_idx), slots, d)
        self.swa_pos = torch.full((slots,), -1, dtype=torch.long, device=self.device)
        self.fa_sel, self.swa_sel = _to(_heads(self.fa_idx), self.device), _to(_heads(self.swa_idx), self.device)
        self._q_sel = None
        # One token at a time goes through the fused Triton kernel where it runs (see decode_kernel).
        self.fused = decode_kernel.available(self.device, self.dtype)
        if self.fused:
            full = [h in self.fa_idx for h in range(self.num_kv_heads)]
            self.codes = decode_kernel.head_codes(full, self.device)
        self.is_initialized = True

    def _reserve(self, length: int):
        """Make FA storage hold `length` tokens: capacity doubling keeps appends amortised O(1)."""
        capacity = self.fa_k.shape[2]
        if length <= capacity:
            return
        if self.max_length is not None:
            raise ValueError(f"HybridCache was built for max_length={self.max_length} tokens, got {length}")
        capacity = max(length, 2 * capacity)
        grow = lambda t: torch.cat([t, t.new_zeros(*t.shape[:2], capacity - t.shape[2], t.shape[3])], 2)  # noqa: E731
        self.fa_k, self.fa_v = grow(self.fa_k), grow(self.fa_v)

    def _slot(self, pos):
        """Buffer slot of an absolute position (int or tensor): sinks keep theirs, the rest wrap around."""
        return torch.where(pos < self.sinks, pos, (pos - self.sinks) % self.window + self.sinks) \
            if isinstance(pos, torch.Tensor) else (pos if pos < self.sinks else (pos - self.sinks) % self.window + self.sinks)

    def _ordered_window(self):
        """The SWA tokens held now, oldest first: sinks (0..ns-1) and a contiguous span from k0."""
        ns = min(self.sinks, self.seen)
        k0 = max(self.sinks, self.seen - self.window)
        slots = [self._slot(p) for p in range(k0, self.seen)]
        idx = torch.tensor(slots, dtype=torch.long, device=self.device)
        return (self.swa_k[:, :, :ns], self.swa_v[:, :, :ns],
                self.swa_k.index_select(2, idx), self.swa_v.index_select(2, idx), k0)

    # -- Cache API ----------------------------------------------------------------------------------
    # Compiled decoder layers (consa.runtime.generation.compile_layers) break their graphs here: the cache's bookkeeping is
    # host-side Python that must run every step, not be specialised into a graph.
    @torch.compiler.disable
    def update(self, key_states, value_states, *args, **kwargs):
        """key/value_states (B, K, q, d) for the new tokens. Stores them; attention runs in `hybrid_attend`."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._new_k, self._new_v = key_states, value_states
        return self, self

    @torch.compiler.disable
    def hybrid_attend(self, module, query, attention_mask=None, scaling=None, softcap=None, **kwargs):
        """query (B, H, q, d) for the new tokens -> (B, q, H, d), then the new tokens are committed.
        softcap: soft-capped attention logits (Gemma 2), computed eagerly; the fused kernel has none."""
        k_new, v_new = self._new_k, self._new_v
        self._new_k = self._new_v = None
        B, H, q_len, d = query.shape
        self.softcap = softcap
        if softcap is not None:
            self.fused = False
        graph = self.graph is not None and q_len == 1
        if self.fused and q_len == 1 and (graph or attention_mask is None):
            return self._attend_fused(query, k_new, v_new, scaling, graph)
        if self._q_sel is None:  # query heads of each part: a GQA group follows its KV head
            groups = H // self.num_kv_heads
            self._q_sel = [_to(_heads([h * groups + g for h in idx for g in range(groups)]), self.device)
                           for idx in (self.fa_idx, self.swa_idx)]
        mask = _as_bool_mask(attention_mask)
        parts = []
        if self.fa_idx:
            q_sel = self._q_sel[0]
            parts.append(self._attend_full(query[:, q_sel], k_new[:, self.fa_sel], v_new[:, self.fa_sel], mask, scaling, graph))
        if self.swa_idx:
            q_sel = self._q_sel[1]
            parts.append(self._attend_window(query[:, q_sel], k_new[:, self.swa_sel], v_new[:, self.swa_sel], mask, scaling, graph))
        self.seen += q_len
        if len(parts) == 1 or self.fa_idx == list(range(len(self.fa_idx))):
            # FA heads first (always so after group_heads): one cat, no scatter
            return (parts[0] if len(parts) == 1 else torch.cat(parts, 1)).transpose(1, 2)  # (B, q, H, d)
        out = query.new_empty(B, q_len, H, d)
        out[:, :, self._q_sel[0]] = parts[0].transpose(1, 2)
        out[:, :, self._q_sel[1]] = parts[1].transpose(1, 2)
        return out

    def _attend_fused(self, query, k_new, v_new, scale, graph):
        """One new token per row: the fused kernel stores its K/V and attends over FA + SWA heads at once."""
        if graph:
            position = self._graph_shared()["position"]
        else:
            self._reserve(self.seen + 1)
            # A fill kernel, not a host-to-device copy (which would wait for the queued layers).
            position = torch.full((1,), self.seen, dtype=torch.long, device=self.device)
        out = decode_kernel.decode_step(query[:, :, 0], k_new[:, :, 0], v_new[:, :, 0], self.fa_k, self.fa_v,
                                        self.swa_k, self.swa_v, self.swa_pos, position, self.codes,
                                        self.window, self.sinks, scale)
        self.seen += 1
        return out.unsqueeze(1)  # (B, 1, H, d)

    def _attend_full(self, q, k, v, mask, scale, graph):
        """FA heads: write the new tokens into storage, attend over everything held."""
        q_len, start = q.shape[2], self.seen
        if graph:
            shared = self._graph_shared()
            self.fa_k.index_copy_(2, shared["position"], k)
            self.fa_v.index_copy_(2, shared["position"], v)
            return decode_attention(q, self.fa_k, self.fa_v, shared["fa_valid"], scale, self.softcap)
        self._reserve(start + q_len)
        self.fa_k[:, :, start:start + q_len] = k
        self.fa_v[:, :, start:start + q_len] = v
        keys, values = self.fa_k[:, :, :start + q_len], self.fa_v[:, :, :start + q_len]
        if q_len == 1 and mask is None:
            return decode_attention(q, keys, values, None, scale, self.softcap)
        if mask is None and start == 0:
            return grouped_sdpa(q, keys, values, is_causal=True, scale=scale, softcap=self.softcap)
        if mask is None:  # a chunk after a prefix: causal with an offset
            q_pos = torch.arange(start, start + q_len, device=q.device)[:, None]
            mask = (torch.arange(start + q_len, device=q.device)[None, :] <= q_pos)[None, None]
        return grouped_sdpa(q, keys, values, mask[..., :start + q_len], scale=scale, softcap=self.softcap)

    def _attend_window(self, q, k, v, mask, scale, graph):
        """SWA heads: attend over sinks + the last W tokens, then keep only those in the buffer."""
        q_len, start = q.shape[2], self.seen
        if graph or (q_len == 1 and mask is None):
            # Write first: the slot of position p held p - W, which p no longer sees.
            if graph:
                shared = self._graph_shared()
                self._write_window(shared["slot"], shared["position"], k, v)
            else:
                slot = torch.tensor([self._slot(start)], device=q.device)
                self._write_window(slot, torch.tensor([start], device=q.device), k, v)
            if start + 1 >= self.sinks + self.window and self.softcap is None:  # every slot visible: one kernel
                return F.scaled_dot_product_attention(q, self.swa_k, self.swa_v, scale=scale, enable_gqa=True)
            return decode_attention(q, self.swa_k, self.swa_v, self.swa_pos >= 0, scale, self.softcap)
        # Several queries (prefill or a chunk): attend over the held window + the new tokens in order.
        if start == 0 and mask is None and q.is_cuda and q_len >= PREFILL_CHUNK:
            # A fresh prompt on the GPU: one FlexAttention call whose block mask skips the key
            # blocks outside each query block's window (and keeps the sinks).
            out = flex_sliding_window(q, k, v, self.window, self.sinks, scale, softcap=self.softcap)
        else:
            sink_k, sink_v, span_k, span_v, k0 = self._ordered_window()
            keys_k, keys_v = torch.cat([sink_k, span_k, k], 2), torch.cat([sink_v, span_v, v], 2)
            ns = min(self.sinks, start + q_len)  # the first ns of the sequence are sinks
            out = banded_attention(q, start, keys_k[:, :, ns:], keys_v[:, :, ns:], k0, self.window,
                                   keys_k[:, :, :ns] if ns else None, keys_v[:, :, :ns] if ns else None,
                                   mask, scale, softcap=self.softcap)
        # Keep what later tokens can still see: the sinks and the last W positions.
        keep = [p for p in range(start, start + q_len) if p < self.sinks or p >= start + q_len - self.window]
        pos = torch.tensor(keep, dtype=torch.long, device=q.device)
        sel = pos - start
        self._write_window(self._slot(pos), pos, k.index_select(2, sel), v.index_select(2, sel))
        return out

    def _graph_shared(self):
        """Per-step tensors every layer needs in graph decoding, computed once per forward by the first
        layer that asks (the position, its ring slot, the FA validity mask)."""
        shared = self.graph
        if shared.get("owner", self) is self:
            shared["owner"] = self
            pos = shared["position"]  # (1,) long
            if self.sinks and self.seen < self.sinks:
                raise ValueError("CUDA-graph decoding needs a prompt of at least sink_tokens tokens")
            shared["slot"] = (pos - self.sinks) % self.window + self.sinks
            if not self.fused and self.fa_k is not None and self.fa_k.shape[2]:
                if "arange" not in shared:
                    shared["arange"] = torch.arange(self.fa_k.shape[2], device=pos.device)
                shared["fa_valid"] = shared["arange"] <= pos  # (capacity,)
        return shared

    def _write_window(self, slot, pos, k, v):
        self.swa_k.index_copy_(2, slot, k)
        self.swa_v.index_copy_(2, slot, v)
        self.swa_pos.index_copy_(0, slot, pos)

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        # Masks cover absolute positions 0..seen+q-1; SWA heads pick the columns they hold.
        # (Older transformers pass the cache_position tensor instead of the query length.)
        q_len = query_length if isinstance(query_length, int) else query_length.shape[0]
        return self.seen + q_len, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self):
        self.seen = 0
        if self.is_initialized:
            self.swa_pos.fill_(-1)

    def reorder_cache(self, beam_idx):
        if self.is_initialized:
            for name in ("fa_k", "fa_v", "swa_k", "swa_v"):
                setattr(self, name, getattr(self, name).index_select(0, beam_idx.to(self.device)))

    def batch_repeat_interleave(self, repeats: int):
        if self.is_initialized:
            for name in ("fa_k", "fa_v", "swa_k", "swa_v"):
                setattr(self, name, getattr(self, name).repeat_interleave(repeats, 0))

    def batch_select_indices(self, indices):
        if self.is_initialized:
            for name in ("fa_k", "fa_v", "swa_k", "swa_v"):
                setattr(self, name, getattr(self, name)[indices])

    def crop(self, tokens_to_remove: int):
        raise NotImplementedError("HybridCache cannot be cropped: SWA heads have dropped old tokens")

    # -- accounting ---------------------------------------------------------------------------------
    # The counts follow consa.runtime.kv_accounting, so a cache and the allocation it serves agree by construction.
    def held_tokens(self) -> tuple[int, int]:
        """(tokens per FA head, tokens per SWA head) held now."""
        return self.seen, swa_tokens(self.seen, self.window, self.sinks)

    def nbytes(self, allocated: bool = False) -> int:
        """K/V bytes of the tokens held; `allocated=True`: of the storage reserved (FA capacity, SWA slots)."""
        if not self.is_initialized:
            return 0
        if allocated:
            return sum(t.numel() * t.element_size() for t in (self.fa_k, self.fa_v, self.swa_k, self.swa_v))
        B, d = self.fa_k.shape[0], self.fa_k.shape[3]  # (B, n_fa, capacity, d)
        per_token = token_bytes(d, self.fa_k.element_size(), B)
        return held_bytes(len(self.fa_idx), len(self.swa_idx), self.seen, self.window, self.sinks, per_token)


class HybridCache(Cache):
    """A KV cache that keeps FA heads whole and SWA heads to their window; pass it to `generate`."""

    def __init__(self, full_mask: torch.Tensor, window: int, sink_tokens: int = 0, max_length: int | None = None):
        """full_mask (num_layers, num_kv_heads) bool, True = full attention. `max_length` preallocates
        FA storage once (needed for CUDA-graph decoding); without it, storage doubles as it fills."""
        layers = [HybridCacheLayer(row.tolist(), window, sink_tokens, max_length) for row in full_mask.bool()]
        super().__init__(layers=layers)
        self.window, self.sink_tokens = window, sink_tokens

    @torch.compiler.disable
    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        # Kept out of compiled layers (consa.runtime.generation.compile_layers), like the layers' own update:
        # host-side bookkeeping.
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    @classmethod
    def for_model(cls, model, allocation=None, max_length: int | None = None) -> "HybridCache":
        """The cache matching a model's installed hybrid attention (or the given allocation)."""
        if allocation is not None:
            return cls(allocation.full_mask(), allocation.window, allocation.sink_tokens, max_length)
        hybrid = getattr(model, "consa_hybrid", None)
        if hybrid is None:
            raise ValueError("the model has no consa hybrid attention installed: load it with consa.load_hybrid "
                             "or call consa.model.hybrid_attention.apply_allocation first")
        z = hybrid.z if hybrid.z is not None else torch.ones(hybrid.num_layers, hybrid.num_kv_heads)
        if not bool(((z == 0) | (z == 1)).all()):
            raise ValueError("HybridCache needs hard gates (every unit full or SWA), got soft gate values")
        return cls(z.detach().cpu() == 1, hybrid.window, hybrid.sink_tokens, max_length)

    def set_graph_position(self, position: torch.Tensor | None):
        """Decode inside a CUDA graph: every layer reads the position to write from this (1,) device tensor
        (FA storage must be static: build the cache with max_length). None switches back to eager."""
        shared = None if position is None else {"position": position}
        for layer in self.layers:
            layer.graph = shared


def make_cache(model, max_length: int | None = None):
    """The memory-saving cache for a model: HybridCache for consa's hybrid attention, else a stock
    DynamicCache built from the config (sliding layers from `layer_types` stay W tokens long)."""
    if getattr(model, "consa_hybrid", None) is not None:
        return HybridCache.for_model(model, max_length=max_length)
    return DynamicCache(config=model.config)


__all__ = ["HybridCache", "HybridCacheLayer", "make_cache"]


def cache_bytes(cache, allocated: bool = False) -> int:
    """Bytes of K/V a live cache holds: a consa HybridCache (its layers count themselves with
    consa.runtime.kv_accounting's formula) or any stock cache with keys/values per layer. `allocated=True` counts reserved
    storage (capacity) instead of the tokens held."""
    total = 0
    for layer in cache.layers:
        if isinstance(layer, HybridCacheLayer):
            total += layer.nbytes(allocated)
        elif getattr(layer, "keys", None) is not None and layer.keys.numel():
            total += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
    return total
