"""Attention units: what one gate switches between full and sliding-window attention.

A `UnitGrid` maps the N units of a granularity onto the (num_layers, num_kv_heads) grid every other
part of consa works in (gate values, allocations, caches). A new granularity is one new subclass
registered in GRIDS; nothing else branches on the granularity's name.
"""

import torch

from consa.core.config import GRANULARITIES, check_registry


class UnitGrid:
    """N units over a (num_layers, num_kv_heads) grid; subclasses say which cells a unit covers."""

    name = ""

    def __init__(self, num_layers: int, num_kv_heads: int):
        self.num_layers, self.num_kv_heads = int(num_layers), int(num_kv_heads)

    @property
    def shape(self) -> tuple[int, int]:
        return self.num_layers, self.num_kv_heads

    @property
    def count(self) -> int:
        raise NotImplementedError

    def to_grid(self, values: torch.Tensor) -> torch.Tensor:
        """(count,) unit values -> (num_layers, num_kv_heads): a unit's value on each of its cells."""
        raise NotImplementedError

    def from_grid(self, grid: torch.Tensor) -> torch.Tensor:
        """(num_layers, num_kv_heads) -> (count,): one value per unit (its first cell)."""
        raise NotImplementedError

    def cells(self, unit: int) -> list[tuple[int, int]]:
        """The (layer, kv_head) cells unit `unit` switches."""
        one = torch.zeros(self.count, dtype=torch.bool)
        one[unit] = True
        return [tuple(c) for c in self.to_grid(one).nonzero().tolist()]

    def label(self, unit: int) -> str:
        raise NotImplementedError

    def expressible(self, full: torch.Tensor) -> bool:
        """Whether a (num_layers, num_kv_heads) full/SWA mask switches whole units only."""
        return torch.equal(self.to_grid(self.from_grid(full)), full)


class LayerGrid(UnitGrid):
    """One unit per layer: all KV heads of a layer switch together."""

    name = "layer"

    @property
    def count(self) -> int:
        return self.num_layers

    def to_grid(self, values):
        return values.reshape(self.num_layers)[:, None].expand(self.num_layers, self.num_kv_heads)

    def from_grid(self, grid):
        return grid[:, 0]

    def label(self, unit):
        return f"layer {unit}"


class KVHeadGrid(UnitGrid):
    """One unit per KV head (with its GQA query group)."""

    name = "kv_head"

    @property
    def count(self) -> int:
        return self.num_layers * self.num_kv_heads

    def to_grid(self, values):
        return values.reshape(self.num_layers, self.num_kv_heads)

    def from_grid(self, grid):
        return grid.reshape(-1)

    def label(self, unit):
        return f"layer {unit // self.num_kv_heads} head {unit % self.num_kv_heads}"


GRIDS = {grid.name: grid for grid in (LayerGrid, KVHeadGrid)}
check_registry("granularities", GRIDS, GRANULARITIES)


def check_granularity(granularity: str) -> str:
    if granularity not in GRIDS:
        raise ValueError(f"unknown granularity {granularity!r}: expected one of {', '.join(GRIDS)}")
    return granularity


def unit_grid(granularity: str, num_layers: int, num_kv_heads: int) -> UnitGrid:
    return GRIDS[check_granularity(granularity)](num_layers, num_kv_heads)


def exact_swa_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean mask, True = SWA, with exactly round(sparsity * N) units set.

    The units with the lowest scores (least wanted as FA) go SWA; ties break by index so the
    result is deterministic.
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    flat = scores.detach().flatten().float().cpu()
    n_swa = int(round(sparsity * flat.numel()))
    order = sorted(range(flat.numel()), key=lambda i: (flat[i].item(), i))
    swa = torch.zeros(flat.numel(), dtype=torch.bool)
    swa[order[:n_swa]] = True
    return swa.view(scores.shape)
