"""Weight surgery for the hybrid cache: put each layer's FA heads before its SWA heads."""

from dataclasses import replace

import torch

from consa.model.hybrid_attention import attention_modules


@torch.no_grad()
def group_heads(model, allocation):
    """Reorder each layer's KV heads (and their query groups) so FA heads come first; returns the
    matching allocation. The model computes exactly the same function; consa.runtime.cache then selects FA
    and SWA heads by slicing (views) instead of gathering, which saves kernels on every decode step.
    Works for attention modules with q_proj / k_proj / v_proj / o_proj (Qwen2/3, Llama, Mistral)."""
    rows = []
    for mod, row in zip(attention_modules(model), allocation.assignment):
        perm = [h for h, v in enumerate(row) if v == "full"] + [h for h, v in enumerate(row) if v != "full"]
        rows.append(sorted(row, key=lambda v: v != "full"))
        if perm == list(range(len(row))):
            continue
        groups = mod.q_proj.out_features // mod.k_proj.out_features
        q_perm = [h * groups + g for h in perm for g in range(groups)]
        for proj, order in ((mod.q_proj, q_perm), (mod.k_proj, perm), (mod.v_proj, perm)):
            w = proj.weight.view(len(order), -1, proj.in_features)  # (heads, d, hidden)
            proj.weight.copy_(w[order].reshape_as(proj.weight))
            if proj.bias is not None:
                proj.bias.copy_(proj.bias.view(len(order), -1)[order].flatten())
        w = mod.o_proj.weight.view(mod.o_proj.out_features, len(q_perm), -1)  # (hidden, heads, d)
        mod.o_proj.weight.copy_(w[:, q_perm].reshape_as(mod.o_proj.weight))
    return replace(allocation, assignment=rows)


__all__ = ["group_heads"]
