"""Unit grids: how a granularity's units map onto (layer, kv_head), and that a new granularity is one class."""

import pytest
import torch

from consa import SearchConfig
from consa.core import config as settings, units
from consa.core.manifest import Allocation
from consa.search.loop import run_search
from consa.core.units import KVHeadGrid, LayerGrid, UnitGrid, unit_grid


@pytest.mark.parametrize("grid,count", [(LayerGrid(5, 3), 5), (KVHeadGrid(5, 3), 15)])
def test_a_grid_round_trips_its_units_and_knows_their_cells(grid, count):
    assert grid.count == count
    values = torch.arange(count, dtype=torch.float)
    on_grid = grid.to_grid(values)  # (L, K)
    assert on_grid.shape == (5, 3)
    assert torch.equal(grid.from_grid(on_grid), values)
    covered = sorted(c for u in range(count) for c in grid.cells(u))
    assert covered == [(l, h) for l in range(5) for h in range(3)]  # every cell, each by one unit
    for u in range(count):
        assert all(on_grid[l, h] == u for l, h in grid.cells(u))


def test_layer_grid_refuses_a_mask_that_splits_a_layer():
    mixed = torch.tensor([[True, False], [True, True]])
    assert not LayerGrid(2, 2).expressible(mixed) and KVHeadGrid(2, 2).expressible(mixed)
    with pytest.raises(ValueError, match="unknown granularity"):
        unit_grid("block", 2, 2)


class LayerPairGrid(UnitGrid):
    """A granularity the product does not ship: two neighbouring layers switch together."""

    name = "layer_pair"

    @property
    def count(self):
        return (self.num_layers + 1) // 2

    def to_grid(self, values):
        return values.reshape(-1).repeat_interleave(2)[:self.num_layers, None].expand(self.num_layers, self.num_kv_heads)

    def from_grid(self, grid):
        return grid[::2, 0]

    def label(self, unit):
        return f"layers {2 * unit}-{2 * unit + 1}"


def test_a_new_granularity_is_one_class(monkeypatch, tiny_model_dir, text_dir):
    monkeypatch.setitem(units.GRIDS, LayerPairGrid.name, LayerPairGrid)
    monkeypatch.setattr(settings, "GRANULARITIES", (*settings.GRANULARITIES, LayerPairGrid.name))  # its declared name
    config = SearchConfig(model=str(tiny_model_dir), sparsity=0.5, granularity="layer_pair", window=8,
                          dataset=str(text_dir), seq_len=64, steps=4)
    allocation = run_search(config).allocation
    rows = [row[0] for row in allocation.assignment]  # 4 layers -> 2 units, one of them SWA
    assert rows[0] == rows[1] and rows[2] == rows[3] and rows.count("swa") == 2
    assert allocation.num_units == 2
    with pytest.raises(ValueError, match="whole units"):
        Allocation(model="m", granularity="layer_pair", num_layers=4, num_kv_heads=2, window=8,
                   assignment=[["swa"] * 2, ["full"] * 2, ["full"] * 2, ["full"] * 2])
