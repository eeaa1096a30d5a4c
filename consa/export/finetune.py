"""A short fine-tune of the weights with an allocation's hard gates in place (optional before export)."""

import torch

from consa.model.hybrid_attention import apply_allocation
from consa.core.manifest import Allocation


def finetune(model, allocation: Allocation, data: torch.Tensor, steps: int, *, lr: float = 1e-5,
             batch_size: int = 1, seed: int = 0, progress=None) -> list[dict]:
    """A short AdamW run on the weights with hard gates in place, next-token loss on `data` (N, T)."""
    apply_allocation(model, allocation)
    device = next(model.parameters()).device
    data = data.to(device)
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    history = []
    for step in range(steps):
        batch = data[torch.randint(0, data.shape[0], (batch_size,), generator=generator)]  # (B, T)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # a few steps on little data: keep them from jumping
        optimizer.step()
        record = {"step": step + 1, "total_steps": steps, "loss": round(loss.item(), 6)}
        history.append(record)
        if progress is not None:
            progress(record)
    model.eval()
    for p in params:
        p.requires_grad_(False)
    return history


def finetune_data(tokenizer, data, seq_len: int, steps: int, batch_size: int, seed: int) -> torch.Tensor:
    """A (N, T) token tensor as given, or packed rows from a text path."""
    from consa.core.data import build_dataset
    from consa.core.errors import ConsaError

    if data is None:
        raise ConsaError("finetune_steps > 0 needs data (a token tensor or a text path)")
    if isinstance(data, torch.Tensor):
        return data
    if tokenizer is None:
        raise ConsaError("fine-tuning on a text path needs the tokenizer")
    return build_dataset(tokenizer, data, seq_len, max(steps * batch_size, 1), seed=seed)


__all__ = ["finetune", "finetune_data"]
