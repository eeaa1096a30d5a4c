"""Hard-Concrete L0 gates (Louizos et al., 2018), one per attention unit.

z = 1 keeps full attention (FA), z = 0 switches the unit to sliding-window attention (SWA).
The stretch (gamma < 0 < 1 < zeta) puts real probability mass on exactly 0 and exactly 1,
which is what lets a gate end up hard while still being trained by gradient.
"""

import math

import torch
from torch import nn

BETA = 2.0 / 3.0  # temperature; the value PruLong and Sheared-LLaMA use
GAMMA = -0.1  # stretch interval (gamma, zeta) around [0, 1]
ZETA = 1.1


class HardConcreteGate(nn.Module):
    """`num_units` independent gates with learnable log_alpha."""

    def __init__(self, num_units: int, init_log_alpha: float = 3.0, beta: float = BETA):
        super().__init__()
        # A high init means every unit starts as FA (z close to 1), i.e. the unmodified model.
        self.log_alpha = nn.Parameter(torch.full((num_units,), float(init_log_alpha)))
        self.beta = beta

    @property
    def num_units(self) -> int:
        return self.log_alpha.numel()

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A reparameterised sample z in [0, 1] per unit (training). The noise is drawn on the CPU from
        `generator` (a search seeds one per step, so a resumed search draws what the original would)."""
        u = torch.rand(self.log_alpha.shape, generator=generator).to(self.log_alpha.device).clamp(1e-6, 1 - 1e-6)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.beta)
        return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)

    def deterministic(self) -> torch.Tensor:
        """The noise-free gate value per unit (evaluation during the search)."""
        s = torch.sigmoid(self.log_alpha)
        return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)

    def forward(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.sample(generator) if self.training else self.deterministic()

    def prob_full(self) -> torch.Tensor:
        """P(z > 0) per unit: the probability that the unit keeps any full attention (the L0 norm term)."""
        return torch.sigmoid(self.log_alpha - self.beta * math.log(-GAMMA / ZETA))

    def expected_sparsity(self) -> torch.Tensor:
        """Expected share of SWA units, s_hat = 1 - mean_u P(z_u > 0); differentiable in log_alpha."""
        return 1.0 - self.prob_full().mean()


def annealed_beta(step: int, total_steps: int, final: float | None, start: float = BETA) -> float:
    """Temperature at `step`: linear from `start` to `final` over the search (constant when final is None).

    A lower temperature makes samples nearer 0/1, so late in the search the task loss sees allocations
    close to the hard one it will be deployed as."""
    if final is None or total_steps <= 1:
        return start
    return start + (final - start) * min(1.0, step / (total_steps - 1))
