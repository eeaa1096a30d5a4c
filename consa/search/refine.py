"""Refinement of a finished search: swap units across the FA/SWA boundary while the loss falls.

The search ranks units by log_alpha, learned with stochastic soft gates; the allocation is the hard
top of that ranking. Units near the boundary are where the ranking is least sure, and where the
hard allocation's own loss can tell them apart. So: take the `candidates` lowest-ranked FA units and
the `candidates` highest-ranked SWA units, evaluate every swap of one of each on held-out rows with
hard gates, keep the best swap if it lowers the objective, and repeat up to `max_swaps` times. The
SWA count never changes, so the allocation stays exact.
"""

import torch

from consa.core.units import exact_swa_mask

CANDIDATES = 4  # units per side of the boundary: 16 swaps evaluated per round
ROWS = 16  # held-out rows the swaps are judged on
BATCH = 4


@torch.no_grad()
def refine_scores(model, hybrid, grid, objective, scores: torch.Tensor, sparsity: float, rows: torch.Tensor,
                  labels: torch.Tensor, max_swaps: int, candidates: int = CANDIDATES, autocast: bool = False):
    """scores (count,) (log_alpha) -> (new scores, swaps made, loss before, loss after).

    The new scores keep exact_swa_mask(new, sparsity) equal to the refined allocation: a swap
    exchanges the two units' scores."""
    scores = scores.detach().float().cpu().clone()
    device = rows.device

    def loss_of(swa: torch.Tensor) -> float:
        hybrid.set_gates(grid.to_grid((~swa).float()).to(device))
        total = 0.0
        for i in range(0, rows.shape[0], BATCH):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = objective.loss(model, hybrid, rows[i:i + BATCH], labels[i:i + BATCH])
            total += loss.float().item() * rows[i:i + BATCH].shape[0]
        return total / rows.shape[0]

    swa = exact_swa_mask(scores, sparsity)
    before = best = loss_of(swa)
    swaps = 0
    try:
        while swaps < max_swaps and 0 < int(swa.sum()) < grid.count:
            fa_units = [u for u in scores.argsort(stable=True).tolist() if not swa[u]][:candidates]
            swa_units = [u for u in scores.argsort(descending=True, stable=True).tolist() if swa[u]][:candidates]
            trials = []
            for f in fa_units:
                for s in swa_units:
                    trial = swa.clone()
                    trial[f], trial[s] = True, False
                    trials.append((loss_of(trial), f, s))
            loss, f, s = min(trials)
            if loss >= best:
                break
            scores[f], scores[s] = scores[s].item(), scores[f].item()
            swa = exact_swa_mask(scores, sparsity)
            best, swaps = loss, swaps + 1
    finally:
        hybrid.set_gates(None)
    return scores, swaps, before, best
