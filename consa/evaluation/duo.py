"""DuoAttention's head identification (Xiao et al., 2024), re-implemented on consa's hybrid attention.

Their recipe (mit-han-lab/duo-attention, duo_attn/train.py and scripts/train.sh), kept here:
- a real-valued gate alpha in [0, 1] per KV head, initialised at 1, mixing the two outputs
  alpha * FA + (1 - alpha) * streaming attention; consa's soft-gate path is exactly that mix;
- loss = MSE of the final hidden states (after the last norm) of the gated model vs the unmodified
  one, on the labelled tokens only (their synthetic passkey answers), + reg_weight * mean |alpha|;
- AdamW (weight decay 0), lr 0.02, reg_weight 0.05 (their released patterns); lr warm-up over the
  first fifth of the steps and decay over the last fifth, never below 0.1 x lr;
- alpha clamped to [0, 1] before every step; weights frozen;
- deployment at a sparsity: the lowest-alpha heads become streaming, the rest full.
Where consa differs, on purpose: the streaming side is consa's SWA (window W, `sink_tokens` sinks)
so every method is evaluated with the same attention, and the data is consa's search data (the
retrieval rows are the passkey documents) instead of BookSum passkeys.
"""

import torch

from consa.core import data as data_mod
from consa.core.errors import Cancelled

LR = 0.02
REG_WEIGHT = 0.05
INIT_ALPHA = 1.0
DEFAULT_STEPS = 200


def lr_factor(step: int, steps: int) -> float:
    """Their schedule: linear warm-up over steps // 5, flat, linear decay over the last steps // 5, floor 0.1."""
    fifth = max(1, steps // 5)
    return min(1.0, max((step + 1) / fifth, 0.1), max((steps - step) / fifth, 0.1))


def duo_head_scores(model, rows: torch.Tensor, labels: torch.Tensor | None = None, *, window: int,
                    sink_tokens: int = 0, steps: int = DEFAULT_STEPS, lr: float = LR, reg_weight: float = REG_WEIGHT,
                    batch_size: int = 1, seed: int = 0, should_cancel=None) -> torch.Tensor:
    """Train DuoAttention's alpha on rows (N, T) (+ labels, IGNORE where unscored); returns (L, K) alpha.

    Higher alpha = the head needs full attention more. The model is left as it was found.
    should_cancel() is asked before every step (Cancelled).
    """
    from consa.model.hybrid_attention import install, model_shape

    num_layers, num_kv_heads = model_shape(model)
    device = next(model.parameters()).device
    autocast = device.type == "cuda"
    previous = getattr(model, "consa_hybrid", None)
    hybrid = previous
    if hybrid is None or hybrid.window != window or hybrid.sink_tokens != sink_tokens:
        hybrid = install(model, window, sink_tokens)
    old_z = hybrid.z
    requires_grad = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    decoder = model.base_model  # the stack without the LM head: its output is the final normed hidden state

    alpha = torch.nn.Parameter(torch.full((num_layers, num_kv_heads), INIT_ALPHA, device=device))
    optimizer = torch.optim.AdamW([alpha], lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps))
    rows = rows.to(device)
    labels = rows if labels is None else labels.to(device)
    order = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(seed))
    try:
        for step in range(steps):
            if should_cancel is not None and should_cancel():
                raise Cancelled(f"cancelled at step {step} of the duo baseline's training")
            with torch.no_grad():
                alpha.clamp_(0.0, 1.0)
            pick = torch.stack([order[(step * batch_size + i) % len(order)] for i in range(batch_size)])
            batch, mask = rows[pick], labels[pick] != data_mod.IGNORE  # (B, T)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                with torch.no_grad():
                    hybrid.set_gates(None)
                    teacher = decoder(input_ids=batch).last_hidden_state.float()  # (B, T, D)
                hybrid.set_gates(alpha)
                student = decoder(input_ids=batch).last_hidden_state.float()
            distill = (teacher - student).pow(2).mean(-1)[mask].sum() / mask.sum().clamp(min=1)
            loss = distill + reg_weight * alpha.abs().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    finally:
        hybrid.set_gates(old_z)
        for p, flag in zip(model.parameters(), requires_grad):
            p.requires_grad_(flag)
    return alpha.detach().float().cpu()


def passkey_rows(tokenizer, text_rows: torch.Tensor, count: int, seed: int = 0, num_keys: int = 4):
    """(rows, labels) of retrieval documents whose filler is the given text rows: DuoAttention's
    synthetic passkey data, built from whatever calibration text a caller has."""
    filler = text_rows.flatten().tolist()
    return data_mod.retrieval_sequences(tokenizer, filler, text_rows.shape[1], count, seed=seed, num_keys=num_keys)
