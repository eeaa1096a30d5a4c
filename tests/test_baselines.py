import pytest
import torch

import tiny
from consa.evaluation.baselines import (baseline_names, baseline_scores, build_baseline, heuristic_loss_scores,
                             interleave_order, needs_calibration, swa_even_quota)
from consa.core.data import IGNORE

SHAPES = [(1, 1), (2, 3), (4, 2), (5, 4), (7, 3), (12, 4), (28, 8)]
SPARSITIES = [0.0, 0.1, 0.25, 1 / 3, 0.5, 0.6, 0.75, 0.9, 1.0]


def _count_swa(a):
    return sum(v == "swa" for row in a.assignment for v in row)


@pytest.mark.parametrize("name, granularity", [(n, g) for g in ("layer", "kv_head") for n in baseline_names(g)
                                                if not needs_calibration(n)])
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


def test_every_baseline_is_offered_and_even_only_where_units_split_layers():
    assert {"duo", "retrieval-heads", "heuristic-loss"} <= set(baseline_names("layer"))
    assert "even" in baseline_names("kv_head") and "even" not in baseline_names("layer")
    assert [n for n in baseline_names("kv_head") if needs_calibration(n)] == ["heuristic-loss", "retrieval-heads",
                                                                             "duo"]


@pytest.mark.parametrize("name", ["retrieval-heads", "duo"])
@pytest.mark.parametrize("granularity, units", [("layer", 4), ("kv_head", 8)])
def test_scored_baselines_hit_the_exact_sparsity_from_the_model(name, granularity, units, monkeypatch):
    monkeypatch.setattr("consa.evaluation.duo.DEFAULT_STEPS", 5)  # the ranking is tested below; here the count
    model = tiny.build_model()
    rows = torch.randint(1, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    for s in (0.25, 0.5):
        a = build_baseline(name, (4, 2), s, granularity, 8, model=model, calibration=rows)
        assert _count_swa(a) == round(s * units) * (8 // units), (name, s)
        assert a.method == name
    assert getattr(model, "consa_hybrid", None) is None or model.consa_hybrid.z is None  # left unmodified


def test_layer_scores_are_the_mean_of_their_heads():
    cells = torch.tensor([[0.9, 0.0], [0.2, 0.3], [0.1, 0.1]])  # layer means 0.45, 0.25, 0.1
    a = build_baseline("retrieval-heads", (3, 2), 1 / 3, "layer", 64, scores=cells)
    assert a.full_layers() == [True, True, False]
    a = build_baseline("duo", (3, 2), 2 / 3, "layer", 64, scores=cells)
    assert a.full_layers() == [True, False, False]
    with pytest.raises(ValueError, match="one value per unit"):
        build_baseline("duo", (3, 2), 0.5, "layer", 64, scores=torch.zeros(5))


def test_retrieval_head_scores_measure_attention_beyond_the_window():
    from consa.evaluation.attention_scores import far_attention_scores

    model = tiny.build_model()
    rows = torch.randint(1, 300, (2, 48), generator=torch.Generator().manual_seed(0))
    far = far_attention_scores(model, rows, window=8)
    assert far.shape == (4, 2) and (far > 0).all() and (far < 1).all()
    # A window as long as the rows leaves nothing beyond it.
    assert far_attention_scores(model, rows, window=48).abs().max() == 0
    # Against a brute-force reference: eager attention weights of the unmodified model.
    model.set_attn_implementation("eager")
    out = model(input_ids=rows, output_attentions=True)
    model.set_attn_implementation("sdpa")
    t = torch.arange(48)
    far_mask = t[None, :] <= t[:, None] - 8  # (q, k) keys the window drops
    for layer, probs in enumerate(out.attentions):  # (B, H, T, T)
        mass = (probs * far_mask).sum(-1)[:, :, 8:].mean((0, 2))  # (H,) over queries at >= window
        assert torch.allclose(far[layer], mass.view(2, 2).mean(1), atol=1e-4)  # GQA group -> its KV head
    # With labels only the queries predicting a labelled token count.
    labels = torch.full_like(rows, IGNORE)
    labels[:, 40] = rows[:, 40]
    at_40 = far_attention_scores(model, rows, window=8, labels=labels)
    probs = out.attentions[0][:, :, 39]  # (B, H, T): query 39 predicts token 40
    assert torch.allclose(at_40[0], (probs * far_mask[39]).sum(-1).mean(0).view(2, 2).mean(1), atol=1e-4)
    assert model.config._attn_implementation == "sdpa"


def test_duo_gates_fall_on_heads_that_do_not_need_full_attention():
    from consa.evaluation.duo import duo_head_scores, lr_factor

    model = tiny.build_model()
    rows = torch.randint(1, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    # A window as long as the rows changes nothing: distillation is zero, only the L1 pull acts, so
    # every alpha falls from 1 by the same amount.
    alpha = duo_head_scores(model, rows, window=40, steps=10)
    assert alpha.shape == (4, 2) and (alpha < 1).all() and torch.allclose(alpha, alpha[0, 0].expand(4, 2))
    # A short window makes some heads matter: they keep a higher alpha than the L1 pull alone leaves.
    alpha = duo_head_scores(model, rows, window=4, steps=10)
    assert alpha.max() > alpha.min()
    assert lr_factor(0, 100) == pytest.approx(0.1) and lr_factor(50, 100) == 1.0 and lr_factor(99, 100) == 0.1
    assert all(p.requires_grad for p in model.parameters()) and model.consa_hybrid.z is None  # as found


def test_baseline_scores_are_reused_across_sparsities():
    model = tiny.build_model()
    rows = torch.randint(1, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    scores = baseline_scores("retrieval-heads", model, rows, "kv_head", 8)
    assert build_baseline("retrieval-heads", (4, 2), 0.5, "kv_head", 8, scores=scores).assignment == \
        build_baseline("retrieval-heads", (4, 2), 0.5, "kv_head", 8, model=model, calibration=rows).assignment
