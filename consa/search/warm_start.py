"""Warm start of the search: gate logits that begin in the order of a training-free ranking.

The search starts every unit far on the full-attention side (init_log_alpha) and lets the task loss
sort them while the sparsity target ramps up. A warm start gives that sort a head start: the units
are ranked by a scored baseline (consa.evaluation.baselines.SCORED; the names are consa.core.config.WARM_STARTS) and their
logits spread evenly over [init - spread/2, init + spread/2] by rank, best unit highest. Ranks rather
than raw scores, so the spread does not depend on the scores' scale.
"""

import torch

from consa.core import data as data_mod
from consa.core.config import WARM_STARTS
from consa.evaluation.baselines import SCORED, baseline_scores, unit_scores

assert set(WARM_STARTS) - {"none"} <= set(SCORED), "a warm start ranks by a scored baseline"

CALIBRATION_ROWS = 8  # as the heuristic-loss baseline in the benchmark


def calibration_of(rows: torch.Tensor, labels: torch.Tensor, count: int = CALIBRATION_ROWS):
    """The first `count` text rows (every token labelled), as a user's calibration text would be;
    the first rows of any kind where the data holds fewer text rows."""
    text = (labels == rows).all(1) & (labels != data_mod.IGNORE).all(1)
    picked = rows[text][:count]
    return picked if picked.shape[0] else rows[:count]


def warm_start_logits(name: str, model, grid, rows: torch.Tensor, labels: torch.Tensor, *, window: int,
                      sink_tokens: int, init: float, spread: float, seed: int = 0) -> torch.Tensor:
    """(grid.count,) initial log_alpha: ranked by baseline `name`'s scores on calibration rows (duo: its
    gates trained on the search's own rows, as the benchmark's duo baseline is)."""
    if name not in WARM_STARTS or name == "none":
        raise ValueError(f"unknown warm start {name!r}: expected one of {', '.join(WARM_STARTS[1:])}")
    scores = unit_scores(grid, baseline_scores(name, model, calibration_of(rows, labels), grid.name, window,
                                               sink_tokens=sink_tokens, dataset=(rows, labels), seed=seed))
    rank = torch.empty(grid.count)
    rank[scores.argsort(stable=True)] = torch.arange(grid.count, dtype=torch.float32)
    return init + spread * (rank / max(1, grid.count - 1) - 0.5)
