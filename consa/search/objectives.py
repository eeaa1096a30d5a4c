"""What the search minimises besides the sparsity constraint: one class per objective, in OBJECTIVES.

An objective gets the gated model (its HybridAttention holds the current gate values) and a batch,
and returns a scalar loss. A new objective is one class here, registered with `@objective`, plus
its tests; `SearchConfig.objective` accepts every registered name.

Memory: no objective materialises (B, T, vocab) logits. The decoder's final hidden states go
through the LM head a chunk of tokens at a time, each chunk under activation checkpointing, so the
forward keeps only the (B, T) per-token losses and the backward rebuilds one chunk's logits at a
time. At 32k tokens and a 152k vocabulary that is the difference between an 18.6 GiB fp32 buffer
(plus its softmax and its gradient) and a few hundred MiB.
"""

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from consa.core import config
from consa.core import data as data_mod
from consa.core.config import check_registry

OBJECTIVES: dict[str, type["Objective"]] = {}
# Elements of one chunk's fp32 logits (B x chunk x vocab): 2^27 = 512 MiB, plus as much for the
# softmax/gradient in the backward. Big enough that the matmuls stay efficient on a GPU.
LOGIT_CHUNK_ELEMENTS = 1 << 27


def objective(cls):
    """Class decorator: register an objective under its `name`; its docstring is its help."""
    OBJECTIVES[cls.name] = cls
    return cls


def get_objective(name: str) -> "Objective":
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}: expected one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]()


def row_means(values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """values (B, T-1) per predicted token -> (B,) mean over the labelled tokens of each row."""
    mask = (labels[:, 1:] != data_mod.IGNORE).float()  # (B, T-1)
    return (values.float() * mask).sum(1) / mask.sum(1).clamp(min=1)


def per_row_mean(values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """values (B, T-1) per predicted token -> mean over labelled tokens of each row, then over rows.

    Averaging per row first gives a retrieval row (a handful of labelled answer tokens) the same
    weight as a text row, so the units that retrieval needs get a signal of their own.
    """
    return row_means(values, labels).mean()


# -- the model's pieces: final hidden states, and the head that turns them into logits -----------------
def final_hidden(model, batch: torch.Tensor) -> torch.Tensor:
    """(B, T, D) hidden states after the decoder's final norm, without running the LM head."""
    return model.get_decoder()(input_ids=batch, use_cache=False).last_hidden_state


def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """hidden (..., D) -> fp32 logits (..., V), as the model's forward would compute them."""
    head = model.get_output_embeddings()
    logits = F.linear(hidden, head.weight, head.bias).float()
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    softcap = getattr(cfg, "final_logit_softcapping", None)  # Gemma 2 style; None for Qwen/Llama/Mistral
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def chunk_tokens(model, rows: int, chunk_elements: int | None = None) -> int:
    """Tokens per chunk so that one chunk's (rows, chunk, vocab) logits hold about chunk_elements."""
    vocab = model.get_output_embeddings().weight.shape[0]
    return max(1, (chunk_elements or LOGIT_CHUNK_ELEMENTS) // max(1, rows * vocab))


def chunked_over_tokens(fn, *tensors: torch.Tensor, chunk: int) -> torch.Tensor:
    """fn(*chunks) -> (B, c) per-token values, applied to slices of dim 1 and concatenated: (B, T).

    Each chunk runs under checkpointing when a gradient is needed, so the backward recomputes one
    chunk's logits at a time instead of keeping all of them."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    out = []
    for start in range(0, tensors[0].shape[1], chunk):
        parts = [t[:, start:start + chunk] for t in tensors]
        out.append(checkpoint(fn, *parts, use_reentrant=False) if needs_grad else fn(*parts))
    return torch.cat(out, dim=1)


def token_nll(model, hidden: torch.Tensor, targets: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """hidden (B, T, D), targets (B, T) -> next-token negative log-likelihood (B, T), chunked."""
    def nll(h, y):  # (B, c, D), (B, c) -> (B, c)
        logits = head_logits(model, h)  # (B, c, V) fp32: one chunk only
        # (B*c, V) rows, not the (B, V, c) "spatial" layout: softmax over a strided class dim ran ~100x
        # slower on the H200 (12 s vs 0.16 s for 32k tokens x 128k vocab, bench/results/current/search_scale_loss.json).
        return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y)

    return chunked_over_tokens(nll, hidden, targets, chunk=chunk or chunk_tokens(model, hidden.shape[0]))


def token_kl(model, student: torch.Tensor, teacher: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """KL(teacher || student) per token (B, T) from the two models' final hidden states (B, T, D), chunked."""
    def kl(s, t):  # (B, c, D) x 2 -> (B, c)
        log_p = F.log_softmax(head_logits(model, t), -1)  # (B, c, V)
        log_q = F.log_softmax(head_logits(model, s), -1)
        return F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)

    # The chunk holds two sets of logits, so it is half as long.
    chunk = chunk or max(1, chunk_tokens(model, student.shape[0]) // 2)
    return chunked_over_tokens(kl, student, teacher, chunk=chunk)


def student_and_teacher(model, hybrid, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states (B, T-1, D) of the gated model and of the unmodified one, at the positions
    that predict a next token."""
    teacher = teacher_hidden(model, hybrid, batch)[:, :-1]
    return final_hidden(model, batch)[:, :-1], teacher


def teacher_hidden(model, hybrid, batch: torch.Tensor) -> torch.Tensor:
    """Final hidden states of the unmodified model (every unit full attention), without gradient."""
    gates = hybrid.z
    try:
        with torch.no_grad():
            hybrid.set_gates(None)
            return final_hidden(model, batch)
    finally:
        hybrid.set_gates(gates)


class Objective:
    name = ""

    def loss(self, model, hybrid, batch: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """batch, labels (B, T); labels are IGNORE where a token is not scored."""
        raise NotImplementedError


@objective
class NextTokenLoss(Objective):
    """Next-token loss of the gated model on the data."""

    name = "lm"

    def loss(self, model, hybrid, batch, labels):
        hidden = final_hidden(model, batch)[:, :-1]  # (B, T-1, D): position i predicts token i+1
        return per_row_mean(token_nll(model, hidden, labels[:, 1:].clamp(min=0)), labels)


@objective
class LogitDistillation(Objective):
    """KL divergence from the unmodified model's next-token distribution."""

    name = "distill"

    def loss(self, model, hybrid, batch, labels):
        student, teacher = student_and_teacher(model, hybrid, batch)  # (B, T-1, D) each
        return per_row_mean(token_kl(model, student, teacher), labels)


@objective
class HiddenDistillation(Objective):
    """Squared distance of the final hidden states from the unmodified model's, relative to their
    norm (DuoAttention's objective; no LM head)."""

    name = "distill-hidden"

    def loss(self, model, hybrid, batch, labels):
        student, teacher = (h.float() for h in student_and_teacher(model, hybrid, batch))  # (B, T-1, D)
        # Relative to the teacher's norm so the loss scale (and so the multipliers' balance) does not
        # depend on the model's hidden size or the final norm's weights.
        err = (student - teacher).pow(2).sum(-1) / teacher.pow(2).sum(-1).clamp(min=1e-6)  # (B, T-1)
        return per_row_mean(err, labels)


@objective
class NextTokenPlusDistillation(Objective):
    """Next-token loss plus the KL divergence from the unmodified model (lm + distill: one student and
    one teacher forward)."""

    name = "lm+distill"

    def loss(self, model, hybrid, batch, labels):
        student, teacher = student_and_teacher(model, hybrid, batch)  # (B, T-1, D) each
        nll = token_nll(model, student, labels[:, 1:].clamp(min=0))  # (B, T-1)
        return per_row_mean(nll + token_kl(model, student, teacher), labels)


check_registry("objectives", OBJECTIVES, config.OBJECTIVES)
