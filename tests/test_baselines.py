import pytest
import torch

import tiny
from consa.baselines import (baseline_names, build_baseline, heuristic_loss_scores, interleave_order,
                             swa_even_quota)

SHAPES = [(1, 1), (2, 3), (4, 2), (5, 4), (7, 3), (12, 4), (28, 8)]
SPARSITIES = [0.0, 0.1, 0.25, 1 / 3, 0.5, 0.6, 0.75, 0.9, 1.0]


def _count_swa(a):
    return sum(v == "swa" for row in a.assignment for v in row)


@pytest.mark.parametrize("name, granularity", [(n, g) for g in ("layer", "kv_head") for n in baseline_names(g)
                                                if n != "heuristic-loss"])
def test_every_rule_hits_the_exact_sparsity(name, granularity):
    for layers, heads in SHAPES:
        for s in SPARSITIES:
            a = build_baseline(name, (layers, heads), s, granularity, window=64, seed=3)
            units = layers if granularity == "layer" else layers * heads
            per_unit = heads if granularity == "layer" else 1
            assert _count_swa(a) == round(s * units) * per_unit, (name, layers, heads, s)
            assert a.method == name and a.granularity == granularity and a.sparsity_target == s


def test_rules_put_swa_where_they_say():
    bottom = build_baseline("bottom", (8, 2), 0.25, "layer", 64)
    assert bottom.full_layers() == [False, False] + [True] * 6
    top = build_baseline("top", (8, 2), 0.25, "layer", 64)  # Qwen: layers >= max_window_layers slide
    assert top.full_layers() == [True] * 6 + [False, False]
    gemma2 = build_baseline("interleave-1:1", (8, 2), 0.5, "layer", 64)
    assert gemma2.full_layers() == [False, True] * 4
    gemma3 = build_baseline("interleave-5:1", (12, 1), 10 / 12, "layer", 64)
    assert gemma3.full_layers() == ([False] * 5 + [True]) * 2
    # below the pattern's own sparsity the SWA layers stay spread over the pattern's local layers
    assert interleave_order(12, 1)[:3] == [6, 2, 8]


def test_even_quota_spreads_heads_over_layers():
    swa = swa_even_quota((4, 4), 0.5)
    assert swa.sum(1).tolist() == [2, 2, 2, 2]
    swa = swa_even_quota((4, 4), 9 / 16)  # 9 heads: 2 per layer and one layer with 3
    assert sorted(swa.sum(1).tolist()) == [2, 2, 2, 3]


def test_random_is_seeded():
    a = build_baseline("random", (12, 4), 0.5, "kv_head", 64, seed=1)
    b = build_baseline("random", (12, 4), 0.5, "kv_head", 64, seed=1)
    c = build_baseline("random", (12, 4), 0.5, "kv_head", 64, seed=2)
    assert a.assignment == b.assignment != c.assignment


def test_heuristic_makes_the_lowest_scoring_units_swa():
    scores = torch.tensor([[0.3, 0.0], [0.1, 0.9], [0.05, 0.2]])
    a = build_baseline("heuristic-loss", (3, 2), 0.5, "kv_head", 64, scores=scores)
    assert a.full_mask().tolist() == [[True, False], [False, True], [False, True]]
    a = build_baseline("heuristic-loss", (3, 2), 1 / 3, "layer", 64, scores=torch.tensor([0.5, 0.1, 0.2]))
    assert a.full_layers() == [True, False, True]


def test_heuristic_loss_scores_measure_the_loss_increase():
    model = tiny.build_model()
    rows = torch.randint(1, 300, (2, 48), generator=torch.Generator().manual_seed(0))
    # A window as long as the sequence changes nothing, so no unit costs anything.
    assert heuristic_loss_scores(model, rows, "kv_head", window=48).abs().max() < 1e-5
    scores = heuristic_loss_scores(model, rows, "layer", window=4)
    assert scores.shape == (4,) and scores.abs().max() > 0
    a = build_baseline("heuristic-loss", (4, 2), 0.5, "layer", 4, model=model, calibration=rows)
    assert a.full_layers() == (scores >= scores.sort().values[2]).tolist()
    assert model.consa_hybrid.z is None  # the model is left unmodified
