"""The method's math: gates, the constraint, the exact final allocation (the toy search runs run_search)."""

import math

import pytest
import torch

import tiny
from consa.core import config
from consa.core.config import SearchConfig
from consa.search.constraint import AugmentedLagrangian
from consa.search.gates import BETA, GAMMA, ZETA, HardConcreteGate, annealed_beta
from consa.core.units import exact_swa_mask
from consa.search.objectives import OBJECTIVES, Objective
from consa.search.loop import run_search


def test_expected_l0_matches_monte_carlo():
    torch.manual_seed(0)
    gate = HardConcreteGate(7)
    gate.log_alpha.data = torch.tensor([-4.0, -1.5, -0.3, 0.0, 0.7, 2.0, 5.0])
    samples = torch.stack([gate.sample() for _ in range(40000)])  # (S, 7)
    empirical = (samples > 0).float().mean(0)
    assert torch.allclose(gate.prob_full(), empirical, atol=0.01)
    # and the closed form itself: P(z > 0) = sigmoid(log_alpha - beta * log(-gamma / zeta))
    assert gate.prob_full()[3].item() == pytest.approx(1 / (1 + math.exp(BETA * math.log(-GAMMA / ZETA))))
    assert gate.expected_sparsity().item() == pytest.approx(1 - empirical.mean().item(), abs=0.01)


def test_gate_is_hard_with_real_mass_at_both_ends_and_deterministic_in_eval():
    torch.manual_seed(0)
    gate = HardConcreteGate(2)
    gate.log_alpha.data = torch.tensor([-0.5, 0.5])
    z = torch.stack([gate.sample() for _ in range(5000)])
    assert ((z == 0).float().mean() > 0.05) and ((z == 1).float().mean() > 0.05)
    assert z.min() >= 0 and z.max() <= 1
    gate.eval()
    assert torch.equal(gate(), gate())
    gate.log_alpha.data = torch.tensor([10.0, -10.0])
    assert gate().tolist() == [1.0, 0.0]


def test_expected_sparsity_has_gradient():
    gate = HardConcreteGate(4)
    gate.expected_sparsity().backward()
    assert (gate.log_alpha.grad < 0).all()  # raising log_alpha lowers the expected SWA share


class ToyImportance(Objective):
    """A task that prefers some units full: importance ramps 0..1 over the units; no model forward."""

    name = "toy-importance"

    def loss(self, model, hybrid, batch, labels):
        importance = torch.linspace(0, 1, hybrid.z.numel())
        return -(importance * hybrid.z.flatten()).sum() * 0.05


@pytest.fixture
def toy_model(monkeypatch):
    monkeypatch.setitem(OBJECTIVES, ToyImportance.name, ToyImportance)
    monkeypatch.setattr(config, "OBJECTIVES", (*config.OBJECTIVES, ToyImportance.name))  # its declared name
    return tiny.build_model(layers=12, kv_heads=4)  # 48 units, as the testbed at kv_head granularity


def _toy_search(model, target, steps=200, seed=0, **settings):
    """run_search itself (its optimizer, Lagrangian and ramp) on the toy task."""
    config = SearchConfig(model="toy", sparsity=target, granularity="kv_head", window=4, seq_len=8, steps=steps,
                          objective=ToyImportance.name, seed=seed, retrieval_ratio=0.0, **settings)
    trace = []
    result = run_search(config, model=model, dataset=torch.ones(steps, 8, dtype=torch.long),
                        progress=lambda r: trace.append((r["target"], r["sparsity"])))
    return result, trace


@pytest.mark.parametrize("target", [0.25, 0.5, 0.75])
def test_lagrangian_drives_expected_sparsity_to_target(toy_model, target):
    result, trace = _toy_search(toy_model, target)
    assert abs(trace[-1][1] - target) < 0.01
    # it tracks the ramp too, not only the end point
    assert max(abs(t - s) for t, s in trace[60:]) < 0.03
    # the task preference decides which units go SWA: low-importance ones (the gates near the
    # boundary stay noisy after 200 steps, so the ranking is checked on the whole, not unit by unit)
    swa = exact_swa_mask(result.gate_state["log_alpha"], target)
    assert swa[: int(target * 48) // 2].all()
    unit = torch.arange(48.0)
    assert unit[~swa].mean() - unit[swa].mean() > 15
    assert result.allocation.sparsity_achieved == target


def test_annealed_temperature_still_reaches_the_target(toy_model):
    result, trace = _toy_search(toy_model, 0.5, temperature_final=0.25)
    assert abs(trace[-1][1] - 0.5) < 0.02 and result.allocation.sparsity_achieved == 0.5


def test_temperature_anneals_linearly_to_its_final_value():
    assert annealed_beta(0, 101, 0.25) == BETA and annealed_beta(100, 101, 0.25) == pytest.approx(0.25)
    assert annealed_beta(50, 101, 0.25) == pytest.approx((BETA + 0.25) / 2)
    assert annealed_beta(70, 101, None) == BETA


def test_target_ramps_from_zero():
    lag = AugmentedLagrangian(0.5, total_steps=100, warmup_frac=0.8)
    assert lag.target_at(0) == 0.0
    assert lag.target_at(40) == pytest.approx(0.25)
    assert lag.target_at(80) == lag.target_at(99) == 0.5


def test_multipliers_ascend_on_the_gap():
    lag = AugmentedLagrangian(0.5, total_steps=10, warmup_frac=0.0, lr=1.0)
    lag.ascend(0.2, step=5)  # below target: lambda1 goes negative, which rewards more sparsity
    assert lag.lambda1 == pytest.approx(-0.3) and lag.lambda2 == pytest.approx(0.09)
    s = torch.tensor(0.2, requires_grad=True)
    lag.penalty(s, 5).backward()
    assert s.grad < 0  # descending the penalty raises s


@pytest.mark.parametrize("n", [1, 2, 3, 7, 12, 28, 48, 224])
@pytest.mark.parametrize("s", [0.0, 0.1, 0.25, 1 / 3, 0.5, 0.75, 0.9, 1.0])
def test_final_allocation_is_exact(n, s):
    torch.manual_seed(n)
    log_alpha = torch.randn(n)
    swa = exact_swa_mask(log_alpha, s)
    assert int(swa.sum()) == round(s * n)
    if 0 < swa.sum() < n:  # the SWA units are the lowest-scoring ones
        assert log_alpha[swa].max() <= log_alpha[~swa].min()


def test_final_allocation_breaks_ties_deterministically():
    swa = exact_swa_mask(torch.zeros(6), 0.5)
    assert swa.tolist() == [True, True, True, False, False, False]


def test_bad_sparsity_is_refused():
    with pytest.raises(ValueError, match="sparsity"):
        exact_swa_mask(torch.zeros(3), 1.5)
    with pytest.raises(ValueError, match="target"):
        AugmentedLagrangian(-0.1, 10)
