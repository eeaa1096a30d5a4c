"""The search variants of issue 12: warm start, lm+distill, refinement by swaps, harder retrieval rows."""

import pytest
import torch

import tiny
from consa.core import data as data_mod
from consa.core.units import exact_swa_mask
from consa.model.hybrid_attention import install
from consa.search.objectives import get_objective
from consa.search.refine import refine_scores
from consa.search.loop import SearchConfig, run_search
from consa.core.units import unit_grid
from consa.search.warm_start import calibration_of, warm_start_logits


def test_warm_start_ranks_the_logits_by_the_baseline_scores(monkeypatch):
    grid = unit_grid("kv_head", 2, 2)
    scores = torch.tensor([0.3, -1.0, 2.0, 0.5])  # unit 2 matters most, unit 1 least
    monkeypatch.setattr("consa.search.warm_start.baseline_scores", lambda *a, **k: scores)
    rows = torch.ones(3, 8, dtype=torch.long)
    logits = warm_start_logits("heuristic-loss", None, grid, rows, rows, window=4, sink_tokens=0, init=3.0, spread=2.0)
    assert logits.tolist() == pytest.approx([3 - 1 / 3, 2.0, 4.0, 3 + 1 / 3])
    with pytest.raises(ValueError, match="warm start"):
        warm_start_logits("none", None, grid, rows, rows, window=4, sink_tokens=0, init=3.0, spread=2.0)


def test_calibration_rows_are_text_rows():
    rows = torch.arange(12).view(4, 3)
    labels = rows.clone()
    labels[1] = data_mod.IGNORE  # a retrieval row: labelled on its answer only
    labels[1, 2] = rows[1, 2]
    assert calibration_of(rows, labels, 2).tolist() == [[0, 1, 2], [6, 7, 8]]


def test_warm_started_search_starts_where_the_heuristic_says(tiny_model_dir, text_dir):
    cfg = dict(model=str(tiny_model_dir), sparsity=0.5, granularity="layer", window=4, dataset=str(text_dir),
               seq_len=32, steps=1, lr=1e-6, warm_start="heuristic-loss", warm_start_spread=4.0)
    result = run_search(SearchConfig(**cfg))
    log_alpha = result.gate_state["log_alpha"]
    assert log_alpha.max() - log_alpha.min() == pytest.approx(4.0, abs=1e-3)  # one tiny step from the start
    # the allocation is the heuristic's when the search barely moves
    from consa.evaluation.baselines import build_baseline, heuristic_loss_scores
    from consa.model.loading import load_model

    model, tok = load_model(str(tiny_model_dir))
    rows, labels = data_mod.build_dataset(tok, str(text_dir), 32, 1, retrieval_ratio=0.0, with_labels=True)
    scores = heuristic_loss_scores(model, calibration_of(rows, labels), "layer", 4)
    assert result.allocation.assignment == build_baseline("heuristic-loss", (4, 2), 0.5, "layer", 4,
                                                          scores=scores).assignment


def test_duo_warm_start_starts_in_duo_order(tiny_model_dir, text_dir):
    """warm_start='duo' trains DuoAttention's gates on the search's own rows and starts the logits in their order."""
    from consa.evaluation.baselines import baseline_scores, build_baseline
    from consa.model.loading import load_model

    model, tok = load_model(str(tiny_model_dir))
    rows, labels = data_mod.build_dataset(tok, str(text_dir), 128, 4, retrieval_ratio=0.5, with_labels=True)
    config = SearchConfig(model=str(tiny_model_dir), sparsity=0.5, granularity="kv_head", window=4, seq_len=128,
                          steps=1, lr=1e-6, warm_start="duo", warm_start_spread=4.0, seed=3)
    result = run_search(config, model=model, tokenizer=tok, dataset=(rows, labels))
    scores = baseline_scores("duo", model, calibration_of(rows, labels), "kv_head", 4, dataset=(rows, labels), seed=3)
    assert scores.std() > 0  # trained gates, not the untouched initial value
    duo = build_baseline("duo", (4, 2), 0.5, "kv_head", 4, scores=scores)
    assert result.allocation.assignment == duo.assignment


class UnitCost:
    """Objective whose loss is the sum of per-unit costs of the SWA units: the best allocation is known."""

    def __init__(self, cost):
        self.cost = cost

    def loss(self, model, hybrid, batch, labels):
        return ((1 - hybrid.z.flatten().cpu()) * self.cost).sum()


def test_refinement_swaps_misranked_units_and_stays_exact():
    model = tiny.build_model()
    hybrid = install(model, 4)
    grid = unit_grid("kv_head", 4, 2)
    cost = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])  # making unit u SWA costs u
    scores = torch.tensor([0.0, 1.0, 5.0, 3.0, 4.0, 2.0, 6.0, 7.0])  # units 2 and 5 are misranked
    rows = torch.ones(4, 8, dtype=torch.long)
    new, swaps, before, after = refine_scores(model, hybrid, grid, UnitCost(cost), scores, 0.5, rows, rows,
                                              max_swaps=5)
    assert exact_swa_mask(new, 0.5).tolist() == [True] * 4 + [False] * 4
    assert swaps == 1 and before == pytest.approx(0 + 1 + 3 + 5) and after == pytest.approx(0 + 1 + 2 + 3)
    assert hybrid.z is None  # the model is left with every unit full
    # nothing to gain: no swap, same ranking
    same, swaps, *_ = refine_scores(model, hybrid, grid, UnitCost(cost), cost, 0.5, rows, rows, max_swaps=5)
    assert swaps == 0 and torch.equal(same, cost)


@pytest.mark.slow
def test_refined_search_records_its_swaps(tiny_model_dir, text_dir):
    cfg = dict(model=str(tiny_model_dir), sparsity=0.5, granularity="kv_head", window=4, dataset=str(text_dir),
               seq_len=32, steps=4, refine_swaps=2)
    result = run_search(SearchConfig(**cfg))
    refine = result.allocation.training["refine"]
    assert refine["held_out_rows"] and refine["swaps"] <= 2 and refine["loss_after"] <= refine["loss_before"]
    assert result.allocation.sparsity_achieved == 0.5
    assert torch.equal(exact_swa_mask(result.gate_state["log_alpha"], 0.5).view(4, 2),
                       ~result.allocation.full_mask())


def test_lm_plus_distill_is_the_sum_of_lm_and_distill():
    model = tiny.build_model()
    hybrid = install(model, 4)
    hybrid.set_gates(torch.full((4, 2), 0.3))
    batch = torch.randint(1, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    labels = batch.clone()
    labels[1, :20] = data_mod.IGNORE
    parts = [get_objective(n).loss(model, hybrid, batch, labels) for n in ("lm", "distill")]
    assert get_objective("lm+distill").loss(model, hybrid, batch, labels).item() == pytest.approx(
        sum(p.item() for p in parts), rel=1e-5)
    assert parts[1].item() > 0  # soft gates with a short window change the distribution


def test_retrieval_keys_reach_the_search_data(tiny_model_dir, text_dir, monkeypatch):
    seen = {}
    real = data_mod.build_dataset

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(data_mod, "build_dataset", spy)
    run_search(SearchConfig(model=str(tiny_model_dir), sparsity=0.5, window=4, dataset=str(text_dir), seq_len=400,
                            steps=2, retrieval_ratio=0.5, retrieval_keys=6))
    assert seen["num_keys"] == 6 and seen["retrieval_ratio"] == 0.5
