"""How much device memory a search step needs, and so whether it must checkpoint activations.

The weights are frozen, so a step holds: the weights (already resident when this is asked), the
activations that the backward to the gates needs, and the loss's chunked logits (consa.search.objectives).
The activations dominate at long context and grow with batch x context x layers; per-layer
activation checkpointing keeps only each layer's input and rebuilds one layer at a time in the
backward (about one extra forward of that layer: ~30% more time when every layer is checkpointed),
which is why `auto` checkpoints only as many layers as the memory needs.

Checkpointed layers can also keep their attention outputs (selective checkpointing), so that their
backward does not run the attention forward again; the plan does so wherever that still fits. Should
a step run out of memory anyway, the search redoes it with every layer checkpointed (consa.search.loop).

The per-token figures below count what autograd saves in one decoder layer with soft gates (both
the full and the sliding-window path run on every head) and frozen weights; tests/test_memory.py holds
them to what autograd actually saves, and bench/search_scale.py --mode saved measures it on a GPU.
"""

from dataclasses import dataclass

import torch

from consa.model.hybrid_attention import decoder_layers

# Leave this share of the free memory for the allocator's fragmentation and the kernels' workspaces.
HEADROOM = 0.85


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _query_width(cfg) -> int:
    """Query heads x head dim: the width of one attention output."""
    return cfg.num_attention_heads * (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def layer_activation_bytes(config, act_bytes: int, fused=(), qk_norm: bool = False) -> int:
    """Bytes autograd saves per token in one decoder layer for the backward to the gates, with soft gates and
    frozen weights (so no linear layer keeps its input). fused: the ops consa.search.fused_kernels installed;
    qk_norm: the attention normalizes q and k (Qwen3)."""
    cfg = _text_config(config)
    d = cfg.hidden_size
    q = _query_width(cfg)
    heads = cfg.num_attention_heads
    kv = (getattr(cfg, "num_key_value_heads", None) or heads) * (q // heads)
    inter = getattr(cfg, "intermediate_size", None) or 4 * d
    # RMSNorm: transformers keeps an fp32 copy of its input, liger-kernel the input itself; one fp32
    # inverse RMS per row either way.
    normed = 2 * d + ((q + kv) if qk_norm else 0)
    norms = normed * (act_bytes if "rms_norm" in fused else 4) + (2 + (2 * heads if qk_norm else 0)) * 4
    # The full-attention kernel keeps q, k, v, its output and a log-sum-exp per head; the SWA kernel (same
    # q, k, v) its output and log-sum-exp; the mix the difference of the two outputs.
    attention = (4 * q + 2 * kv) * act_bytes + 2 * heads * 4
    # SwiGLU: transformers keeps gate, up and SiLU(gate); liger-kernel gate and up.
    mlp = (2 if "swiglu" in fused else 3) * inter * act_bytes
    return norms + attention + mlp


@dataclass
class StepEstimate:
    """Bytes one search step needs on top of the resident weights."""
    per_layer: int  # what the backward needs from one decoder layer, not checkpointed
    layer_input: int  # what a checkpointed layer keeps: its input
    attention_outputs: int  # what it keeps besides when it keeps its attention: the FA and the SWA output
    layers: int
    loss: int  # hidden states (student, teacher) and one chunk of logits with its gradient
    free: int | None  # bytes free on the device (None: unknown, e.g. CPU)

    @property
    def activations(self) -> int:
        return self.layers * self.per_layer

    def peak(self, checkpointed, keep_attention: bool = False) -> int:
        """checkpointed: how many layers recompute their activations (True = all, False = none)."""
        k = self.layers if checkpointed is True else int(checkpointed)
        kept = self.layer_input + (self.attention_outputs if keep_attention else 0)
        rebuilt = self.per_layer if k else 0  # the backward rebuilds one checkpointed layer at a time
        return (self.layers - k) * self.per_layer + k * kept + rebuilt + self.loss

    def fits(self, checkpointed, keep_attention: bool = False) -> bool:
        return self.free is None or self.peak(checkpointed, keep_attention) <= HEADROOM * self.free

    def plan(self, layers: int | None = None, keep_attention: bool = True) -> tuple[int, bool]:
        """(layers to checkpoint, whether they keep their attention outputs). layers=None: the fewest that
        make the step fit (every layer not checkpointed saves its share of the recomputation; all of
        them when nothing fits). Keeping the attention outputs is preferred wherever it fits: it saves
        the most expensive part of what is left to recompute: Llama-3-8B at 32k, 4.75 s vs 4.98 s a
        step (bench/RESULTS.md). keep_attention=False: never keep them."""
        for keep in (True, False) if keep_attention else (False,):
            candidates = range(self.layers + 1) if layers is None else (layers,)
            k = next((k for k in candidates if self.fits(k, keep)), None)
            if k is not None:
                return k, keep and k > 0
        return (self.layers if layers is None else layers), False


def estimate_step(config, seq_len: int, batch_size: int, act_bytes: int = 2, free: int | None = None,
                  fused=(), qk_norm: bool = False) -> StepEstimate:
    """config: the model's (transformers) config; act_bytes: bytes per activation element (2 for bf16);
    fused, qk_norm: as for layer_activation_bytes."""
    from consa.search.objectives import LOGIT_CHUNK_ELEMENTS

    cfg = _text_config(config)
    tokens = seq_len * batch_size
    hidden = cfg.hidden_size * tokens
    loss = 2 * hidden * 4 + 3 * LOGIT_CHUNK_ELEMENTS * 4  # fp32 hidden x2; logits, softmax, gradient
    attention_outputs = 2 * _query_width(cfg) * tokens * act_bytes
    return StepEstimate(per_layer=layer_activation_bytes(cfg, act_bytes, fused, qk_norm) * tokens, layer_input=hidden * act_bytes,
                        attention_outputs=attention_outputs, layers=cfg.num_hidden_layers, loss=loss, free=free)


def free_bytes(device) -> int | None:
    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


def checkpoint_plan(setting: str, model, seq_len: int, batch_size: int, device,
                    keep_attention: bool = True) -> tuple[int, bool, StepEstimate]:
    """(layers the search checkpoints, whether they keep their attention outputs, the estimate), for
    SearchConfig.gradient_checkpointing: "on" all, "off" none, "auto" the fewest that make the step fit
    the device's free memory (none when it fits)."""
    act_bytes = 2 if next(model.parameters()).dtype in (torch.bfloat16, torch.float16) or \
        torch.device(device).type == "cuda" else 4  # bf16 autocast on a GPU either way
    qk_norm = any(hasattr(m, "q_norm") for m in model.modules())
    estimate = estimate_step(model.config, seq_len, batch_size, act_bytes, free_bytes(device),
                             fused=getattr(model, "consa_fused_kernels", ()), qk_norm=qk_norm)
    layers, keep = estimate.plan({"on": estimate.layers, "off": 0}.get(setting), keep_attention)
    return layers, keep, estimate


def _keep_attention_outputs(ctx, op, *args, **kwargs):
    """Selective checkpointing policy: keep what the attention kernels return, recompute the rest. At long
    context the attention forward is the most expensive op of a layer to redo, and its output the
    cheapest to keep (one value per query, the size of the layer's input)."""
    from torch.utils.checkpoint import CheckpointPolicy

    name = str(op)
    keep = "scaled_dot_product" in name or "flex_attention" in name
    return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE


def enable_checkpointing(model, layers: int, keep_attention: bool = False) -> None:
    """Checkpoint the bottom `layers` decoder layers (0 turns checkpointing off); the others keep their
    activations. transformers' own switch is all-or-nothing (or every n-th layer) in the versions consa
    supports, so the per-layer flags are set here after it. keep_attention: selective checkpointing that
    saves the attention outputs of checkpointed layers (`_keep_attention_outputs`)."""
    blocks = decoder_layers(model)
    model.consa_checkpointing = (min(max(layers, 0), len(blocks)), bool(keep_attention and layers > 0 and blocks))
    if layers <= 0 or not blocks:
        new_names = hasattr(model, "activation_checkpointing_disable")  # transformers 5.2x renamed them
        active = model.is_activation_checkpointing if new_names else model.is_gradient_checkpointing
        if active:
            (model.activation_checkpointing_disable if new_names else model.gradient_checkpointing_disable)()
        return
    kwargs = {"use_reentrant": False}
    if keep_attention:
        from functools import partial

        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        kwargs["context_fn"] = partial(create_selective_checkpoint_contexts, _keep_attention_outputs)
    if getattr(model, "_require_grads_hook", None) is not None:
        model.disable_input_require_grads()  # enabling adds its embedding hook again: one per search otherwise
    if hasattr(model, "activation_checkpointing_enable"):  # the new name from transformers 5.2x on
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    for i, block in enumerate(blocks):
        block.gradient_checkpointing = i < layers
