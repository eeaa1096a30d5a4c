"""Training-free retrieval-head scores: how much attention each KV head puts beyond the window.

A head that a sliding window would cut off is one whose queries look far back. On calibration rows,
for every query at position >= window (the only ones a window can change), we measure the softmax
mass on keys the window drops (k <= q - W, sinks excepted); a KV head's score is that mass averaged
over its GQA query group and over the queries. Where labels are given, only the queries that predict
a labelled token count: on retrieval rows that is the answer, i.e. the attention that retrieves.

The scores are read from inside the model's own attention call: a probe function registered in
transformers' attention registry sees query and key after RoPE (KV heads not repeated), accumulates
the mass, and returns the ordinary SDPA output, so the forward pass is the unmodified model's.
"""

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from consa.core import data as data_mod

PROBE_NAME = "consa_far_mass_probe"
QUERY_CHUNK = 512  # queries per softmax: (B, H, 512, T) fp32 stays ~64 MB at 4k context


class FarMassProbe:
    """Accumulates far-key attention mass per (layer, kv_head) while the model runs."""

    def __init__(self, num_layers: int, num_kv_heads: int, window: int, sink_tokens: int = 0):
        self.window, self.sink_tokens = window, sink_tokens
        self.mass = torch.zeros(num_layers, num_kv_heads, dtype=torch.float64)
        self.queries = torch.zeros(num_layers, dtype=torch.float64)
        self.query_mask = None  # (B, T) bool: which queries count in the current batch

    @torch.no_grad()
    def observe(self, layer: int, query: torch.Tensor, key: torch.Tensor, scaling: float, softcap=None) -> None:
        """query (B, H, T, d), key (B, K, T, d) after RoPE; prefill of whole rows (no cache). softcap: the
        family's attention logit soft-cap (Gemma 2), applied as its attention applies it."""
        b, h, t, _ = query.shape
        k_heads = key.shape[1]
        groups = h // k_heads
        k = key.float().repeat_interleave(groups, dim=1)  # (B, H, T, d)
        k_pos = torch.arange(t, device=query.device)
        for start in range(self.window, t, QUERY_CHUNK):
            q = query[:, :, start:start + QUERY_CHUNK].float()  # (B, H, c, d)
            q_pos = torch.arange(start, start + q.shape[2], device=query.device)[:, None]  # (c, 1)
            causal = k_pos[None, :] <= q_pos  # (c, T)
            far = causal & (k_pos[None, :] <= q_pos - self.window) & (k_pos[None, :] >= self.sink_tokens)
            logits = (q @ k.transpose(-1, -2)) * scaling  # (B, H, c, T)
            if softcap is not None:
                logits = torch.tanh(logits / softcap) * softcap
            probs = logits.masked_fill(~causal, float("-inf")).softmax(-1)
            far_mass = (probs * far).sum(-1)  # (B, H, c)
            weight = self.query_mask[:, start:start + q.shape[2]].float()[:, None]  # (B, 1, c)
            per_kv = (far_mass * weight).view(b, k_heads, groups, -1).mean(2).sum((0, 2))  # (K,)
            self.mass[layer] += per_kv.double().cpu()
            self.queries[layer] += weight.sum().double().cpu()

    def scores(self) -> torch.Tensor:
        """(num_layers, num_kv_heads): mean far mass per counted query."""
        return (self.mass / self.queries.clamp(min=1)[:, None]).float()


def _probe_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    probe = getattr(module, "consa_far_mass_probe", None)
    if probe is not None:
        probe.observe(module.layer_idx, query, key, scaling if scaling is not None else query.shape[-1] ** -0.5,
                      kwargs.get("softcap"))
    kwargs.pop("sliding_window", None)
    if kwargs.get("softcap") is not None:  # Gemma 2: no SDPA path for soft-capped logits
        from consa.model.hybrid_attention import eager_attention

        out = eager_attention(query, key, value, attention_mask, scaling, kwargs["softcap"], dropout)
        return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


AttentionInterface.register(PROBE_NAME, _probe_forward)
AttentionMaskInterface.register(PROBE_NAME, sdpa_mask)  # without it the causal mask arrives as None


@torch.no_grad()
def far_attention_scores(model, rows: torch.Tensor, window: int, sink_tokens: int = 0,
                         labels: torch.Tensor | None = None, batch_size: int = 1) -> torch.Tensor:
    """(num_layers, num_kv_heads) attention mass beyond the window, on rows (N, T).

    labels (N, T), IGNORE where a token is not scored: only the queries predicting a labelled token
    count (the answer of a retrieval row). Without labels every query at position >= window counts.
    """
    from consa.model.hybrid_attention import attention_modules, model_shape

    num_layers, num_kv_heads = model_shape(model)
    probe = FarMassProbe(num_layers, num_kv_heads, window, sink_tokens)
    device = next(model.parameters()).device
    modules = attention_modules(model)
    previous = model.config._attn_implementation
    model.set_attn_implementation(PROBE_NAME)
    for mod in modules:
        mod.consa_far_mass_probe = probe
    try:
        for i in range(0, rows.shape[0], batch_size):
            batch = rows[i:i + batch_size].to(device)  # (B, T)
            if labels is None:
                probe.query_mask = torch.ones_like(batch, dtype=torch.bool)
            else:
                wanted = labels[i:i + batch_size].to(device) != data_mod.IGNORE
                probe.query_mask = torch.zeros_like(wanted)
                probe.query_mask[:, :-1] = wanted[:, 1:]  # the query at t predicts token t + 1
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                model(input_ids=batch)
    finally:
        for mod in modules:
            mod.consa_far_mass_probe = None
        model.set_attn_implementation(previous)
    return probe.scores()
