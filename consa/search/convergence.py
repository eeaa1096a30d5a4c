"""Did the search's gates reach the target? A search too short for its learning rate ends with the
expected sparsity ŝ far from the target t; the final ranking still switches exactly round(t * N)
units, but it ranks gates that barely moved, so the allocation is close to the initial order."""

import math

# |ŝ - t| above this is "far": a search that converged ends within about a hundredth of its target.
TOLERANCE = 0.05


def convergence_warning(target: float, final_expected_sparsity: float | None, steps: int) -> str | None:
    """A one-line warning (with the steps a rerun would need) when ŝ ended far from t, else None."""
    s_hat = final_expected_sparsity
    if s_hat is None or abs(target - s_hat) <= TOLERANCE:
        return None
    if 0 < s_hat < target:
        # ŝ grows roughly in proportion to the steps taken (the target ramps linearly during warm-up).
        need = math.ceil(steps * target / s_hat / 100) * 100
        advice = f"about {need} steps (--steps {need}) would let them reach it"
    elif s_hat <= 0:
        advice = f"the gates did not move at all: many more steps (--steps {steps * 20}) or a higher --lr"
    else:
        advice = "a longer search (--steps) or a lower --lr would let them settle"
    return (f"the gates did not reach the target: expected sparsity {s_hat:.3f} after {steps} steps against "
            f"{target:g}; the allocation still switches the exact count, but ranks gates that barely moved; "
            f"{advice}")


__all__ = ["convergence_warning", "TOLERANCE"]
