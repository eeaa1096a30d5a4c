"""Augmented Lagrangian that drives the expected SWA share to the user's target.

    L = L_task + lambda1 * (s_hat - t) + lambda2 * (s_hat - t)^2

The gates minimise L; lambda1 and lambda2 maximise it (gradient ascent), so any lasting gap
between s_hat and t grows the penalty until the gates close it. The target ramps from 0 so the
model is not pushed to the final sparsity before the gates know which units matter.
"""

from dataclasses import dataclass

import torch


@dataclass
class AugmentedLagrangian:
    target: float
    total_steps: int
    warmup_frac: float = 0.8  # share of steps over which t ramps 0 -> target (PruLong: 80%)
    lr: float = 1.0  # ascent step on the multipliers
    lambda1: float = 0.0
    lambda2: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.target <= 1.0:
            raise ValueError(f"target sparsity must be in [0, 1], got {self.target}")
        if not 0.0 <= self.warmup_frac <= 1.0:
            raise ValueError(f"warmup_frac must be in [0, 1], got {self.warmup_frac}")

    def target_at(self, step: int) -> float:
        ramp_steps = self.warmup_frac * self.total_steps
        if ramp_steps <= 0:
            return self.target
        return self.target * min(1.0, step / ramp_steps)

    def penalty(self, s_hat: torch.Tensor, step: int) -> torch.Tensor:
        gap = s_hat - self.target_at(step)
        return self.lambda1 * gap + self.lambda2 * gap * gap

    def ascend(self, s_hat: float, step: int) -> None:
        """Gradient ascent on the multipliers: dL/dlambda1 = gap, dL/dlambda2 = gap^2."""
        gap = float(s_hat) - self.target_at(step)
        self.lambda1 += self.lr * gap
        self.lambda2 += self.lr * gap * gap

    def state_dict(self) -> dict:
        return {"lambda1": self.lambda1, "lambda2": self.lambda2}

    def load_state_dict(self, state: dict) -> None:
        self.lambda1 = float(state["lambda1"])
        self.lambda2 = float(state["lambda2"])
