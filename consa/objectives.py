"""What the search minimises besides the sparsity constraint: one class per objective, in OBJECTIVES.

An objective gets the gated model (its HybridAttention holds the current gate values) and a batch,
and returns a scalar loss. A new objective is one class here, registered with `@objective`, plus
its tests; `SearchConfig.objective` accepts every registered name.
"""

import torch
import torch.nn.functional as F

from consa import data as data_mod

OBJECTIVES: dict[str, type["Objective"]] = {}


def objective(cls):
    """Class decorator: register an objective under its `name`."""
    OBJECTIVES[cls.name] = cls
    return cls


def get_objective(name: str) -> "Objective":
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}: expected one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]()


def per_row_mean(values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """values (B, T-1) per predicted token -> mean over labelled tokens of each row, then over rows.

    Averaging per row first gives a retrieval row (a handful of labelled answer tokens) the same
    weight as a text row, so the units that retrieval needs get a signal of their own.
    """
    mask = (labels[:, 1:] != data_mod.IGNORE).float()  # (B, T-1)
    return ((values * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()


class Objective:
    name = ""
    help = ""

    def loss(self, model, hybrid, batch: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """batch, labels (B, T); labels are IGNORE where a token is not scored."""
        raise NotImplementedError


@objective
class NextTokenLoss(Objective):
    name = "lm"
    help = "next-token loss of the gated model on the data"

    def loss(self, model, hybrid, batch, labels):
        logits = model(input_ids=batch).logits[:, :-1].float()  # (B, T-1, V)
        nll = F.cross_entropy(logits.transpose(1, 2), labels[:, 1:].clamp(min=0), reduction="none")  # (B, T-1)
        return per_row_mean(nll, labels)


@objective
class LogitDistillation(Objective):
    name = "distill"
    help = "KL divergence from the unmodified model's next-token distribution"

    def loss(self, model, hybrid, batch, labels):
        gates = hybrid.z
        with torch.no_grad():
            hybrid.set_gates(None)  # all full = the unmodified teacher
            teacher = model(input_ids=batch).logits[:, :-1].float()
        hybrid.set_gates(gates)
        student = model(input_ids=batch).logits[:, :-1].float()
        # KL(teacher || student) per predicted token: (B, T-1)
        kl = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction="none").sum(-1)
        return per_row_mean(kl, labels)
