"""KV-cache bytes: the one formula behind the evaluation report, the hybrid cache's own count,
`consa generate` and the benchmarks.

After T tokens a full-attention (FA) unit holds all T; a sliding-window (SWA) unit holds its S sink
tokens and the last W tokens after them, min(T, S) + min(max(T - S, 0), W). Each token held costs
2 (K and V) * head_dim * element_size bytes per KV head and batch row. An SWA share s with no sinks
therefore reaches (1 - s) + s * min(W, T) / T of full attention's bytes, and no less.
"""


def swa_tokens(context: int, window: int, sinks: int = 0) -> int:
    """Tokens an SWA unit holds after `context` tokens: its sinks, then the last `window` of the rest."""
    return min(context, sinks) + min(max(context - sinks, 0), window)


def token_bytes(head_dim: int, element_size: int, batch_size: int = 1) -> int:
    """Bytes one token costs in one KV head: K and V, head_dim values each, every batch row."""
    return 2 * batch_size * head_dim * element_size


def held_bytes(num_full: int, num_swa: int, context: int, window: int, sinks: int, per_token: int) -> int:
    """Bytes `num_full` FA units and `num_swa` SWA units hold after `context` tokens."""
    return per_token * (num_full * context + num_swa * swa_tokens(context, window, sinks))


def kv_bytes(allocation, shape: tuple[int, int], context: int, head_dim: int, element_size: int = 2,
             batch_size: int = 1) -> dict:
    """KV bytes of `batch_size` sequences of `context` tokens under `allocation` (None = full
    attention) on a model of `shape` = (num_layers, num_kv_heads), next to full attention's."""
    per_token = token_bytes(head_dim, element_size, batch_size)
    units = shape[0] * shape[1]
    full_bytes = held_bytes(units, 0, context, 0, 0, per_token)
    if allocation is None:
        return {"kv_bytes": full_bytes, "kv_bytes_full": full_bytes, "kv_bytes_ratio": 1.0}
    full_mask = allocation.full_mask()  # (L, K) bool, True = FA
    if tuple(full_mask.shape) != tuple(shape):
        raise ValueError(f"the allocation covers {tuple(full_mask.shape)} (layers, KV heads), the model {tuple(shape)}")
    num_full = int(full_mask.sum())
    kv = held_bytes(num_full, units - num_full, context, allocation.window, allocation.sink_tokens, per_token)
    return {"kv_bytes": kv, "kv_bytes_full": full_bytes, "kv_bytes_ratio": kv / full_bytes}


def floor_ratio(sparsity: float, window: int, context: int, sinks: int = 0) -> float:
    """The KV-bytes ratio to full attention that an SWA share `sparsity` reaches after `context`
    tokens: (1 - s) + s * W / L with sinks = 0 and W < L."""
    return (1 - sparsity) + sparsity * swa_tokens(context, window, sinks) / context


def head_dim_of(model) -> int:
    """Values per token in one KV head (configs without `head_dim` split hidden_size over the heads)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


__all__ = ["swa_tokens", "token_bytes", "held_bytes", "kv_bytes", "floor_ratio", "head_dim_of"]
