"""How much device memory a search step needs, and so whether it must checkpoint activations.

The weights are frozen, so a step holds: the weights (already resident when this is asked), the
activations that the backward to the gates needs, and the loss's chunked logits (consa.objectives).
The activations dominate at long context and grow with batch x context x layers; per-layer
activation checkpointing keeps only each layer's input and rebuilds one layer at a time in the
backward (about one extra forward: ~30% more time), which is why it is chosen only when needed.

The per-token figures below count what autograd saves in one decoder layer with soft gates (both
the full and the sliding-window path run on every head); they overestimate a measured Llama-3-8B
step (8k tokens, fp32 weights + autocast: 94 GiB peak, about 150 KB per token and layer where this
says 200 KB), which errs on the side of checkpointing.
"""

from dataclasses import dataclass

import torch

GIB = 1 << 30
# Leave this share of the free memory for the allocator's fragmentation and the kernels' workspaces.
HEADROOM = 0.85


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def layer_activation_elements(config) -> int:
    """Elements saved per token in one decoder layer for the backward, with soft gates."""
    cfg = _text_config(config)
    d = cfg.hidden_size
    head_dim = getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads
    q = cfg.num_attention_heads * head_dim
    kv = (getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads) * head_dim
    inter = getattr(cfg, "intermediate_size", None) or 4 * d
    # norms and residuals (4d); q/k/v before and after RoPE/qk-norm (2q + 4kv); the full and the SWA
    # outputs, their mix and o_proj's input (4q); the MLP's gate, up, activation and product (4 inter).
    return 4 * d + 6 * q + 4 * kv + 4 * inter


@dataclass
class StepEstimate:
    """Bytes one search step needs on top of the resident weights."""
    activations: int  # everything the backward needs, no checkpointing
    checkpointed: int  # per-layer checkpointing: the layer inputs plus one layer rebuilt at a time
    loss: int  # hidden states (student, teacher) and one chunk of logits with its gradient
    free: int | None  # bytes free on the device (None: unknown, e.g. CPU)

    def peak(self, checkpointing: bool) -> int:
        return (self.checkpointed if checkpointing else self.activations) + self.loss

    def fits(self, checkpointing: bool) -> bool:
        return self.free is None or self.peak(checkpointing) <= HEADROOM * self.free

    def describe(self) -> str:
        free = "unknown" if self.free is None else f"{self.free / GIB:.1f} GiB"
        return (f"step needs ~{self.peak(False) / GIB:.1f} GiB (checkpointed ~{self.peak(True) / GIB:.1f} GiB), "
                f"free {free}")


def estimate_step(config, seq_len: int, batch_size: int, act_bytes: int = 2, free: int | None = None) -> StepEstimate:
    """config: the model's (transformers) config; act_bytes: bytes per activation element (2 for bf16)."""
    from consa.objectives import LOGIT_CHUNK_ELEMENTS

    cfg = _text_config(config)
    tokens = seq_len * batch_size
    layers = cfg.num_hidden_layers
    per_layer = layer_activation_elements(cfg) * tokens * act_bytes
    hidden = cfg.hidden_size * tokens
    loss = 2 * hidden * 4 + 3 * LOGIT_CHUNK_ELEMENTS * 4  # fp32 hidden x2; logits, softmax, gradient
    return StepEstimate(activations=layers * per_layer, checkpointed=layers * hidden * act_bytes + per_layer,
                        loss=loss, free=free)


def free_bytes(device) -> int | None:
    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


def use_checkpointing(setting: str, model, seq_len: int, batch_size: int, device) -> tuple[bool, StepEstimate]:
    """The search's choice for SearchConfig.gradient_checkpointing: "on"/"off" as asked; "auto" checkpoints
    exactly when the step would not fit the device's free memory without it."""
    act_bytes = 2 if next(model.parameters()).dtype in (torch.bfloat16, torch.float16) or \
        torch.device(device).type == "cuda" else 4  # bf16 autocast on a GPU either way
    estimate = estimate_step(model.config, seq_len, batch_size, act_bytes, free_bytes(device))
    if setting == "auto":
        return not estimate.fits(False), estimate
    return setting == "on", estimate
