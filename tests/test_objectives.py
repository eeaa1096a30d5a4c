"""The objectives: chunked LM loss and KL equal the full-logits ones (values and gate gradients)."""

import pytest
import torch
import torch.nn.functional as F

import tiny
from consa.search import objectives
from consa.model.hybrid_attention import install


def _gated(model_type="qwen3", **config):
    model = tiny.build_model(model_type, **config)
    for p in model.parameters():
        p.requires_grad_(False)
    hybrid = install(model, window=4)
    z = torch.full((4, 2), 0.6, requires_grad=True)  # soft gates: both paths matter
    hybrid.set_gates(z)
    return model, hybrid, z


def _batch(seed=0, rows=2, length=24):
    g = torch.Generator().manual_seed(seed)
    batch = torch.randint(1, 300, (rows, length), generator=g)
    labels = batch.clone()
    labels[1, :10] = -100  # a row scored only on its tail, like a retrieval row
    return batch, labels


def _full_logits_lm(model, batch, labels):
    """The objective as it was before chunking: (B, T, V) fp32 logits in one piece."""
    logits = model(input_ids=batch).logits[:, :-1].float()
    nll = F.cross_entropy(logits.transpose(1, 2), labels[:, 1:].clamp(min=0), reduction="none")
    return objectives.per_row_mean(nll, labels)


def _full_logits_kl(model, hybrid, batch, labels):
    z = hybrid.z
    with torch.no_grad():
        hybrid.set_gates(None)
        teacher = model(input_ids=batch).logits[:, :-1].float()
    hybrid.set_gates(z)
    student = model(input_ids=batch).logits[:, :-1].float()
    kl = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction="none").sum(-1)
    return objectives.per_row_mean(kl, labels)


@pytest.mark.parametrize("name,reference", [("lm", lambda m, h, b, l: _full_logits_lm(m, b, l)),
                                            ("distill", _full_logits_kl)])
def test_chunked_loss_equals_the_full_logits_loss(monkeypatch, name, reference):
    model, hybrid, z = _gated()
    batch, labels = _batch()
    expected = reference(model, hybrid, batch, labels)
    (expected_grad,) = torch.autograd.grad(expected, z)

    # 2 rows x 300 vocab x 5 tokens: several chunks, the last one short (23 predicted tokens).
    monkeypatch.setattr(objectives, "LOGIT_CHUNK_ELEMENTS", 2 * 300 * 5 * 2)
    assert objectives.chunk_tokens(model, 2) == 10
    got = objectives.get_objective(name).loss(model, hybrid, batch, labels)
    (got_grad,) = torch.autograd.grad(got, z)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.allclose(got_grad, expected_grad, atol=1e-6, rtol=1e-4)
    assert expected_grad.abs().sum() > 0


def test_chunked_backward_recomputes_one_chunk_of_logits_at_a_time(monkeypatch):
    """Checkpointing per chunk: the graph keeps no (B, chunk, V) logits between forward and backward."""
    model, hybrid, z = _gated(vocab_size=300)
    batch, labels = _batch(length=64)
    monkeypatch.setattr(objectives, "LOGIT_CHUNK_ELEMENTS", 2 * 300 * 8)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        objectives.get_objective("lm").loss(model, hybrid, batch, labels)
    assert not any(len(s) == 3 and s[-1] == 300 for s in saved), "per-chunk logits were kept for the backward"


@pytest.mark.parametrize("model_type", ["qwen3", "qwen2", "llama", "mistral"])
def test_head_of_final_hidden_is_the_models_logits(model_type):
    model = tiny.build_model(model_type)
    batch, _ = _batch()
    with torch.no_grad():
        logits = objectives.head_logits(model, objectives.final_hidden(model, batch))
        assert torch.allclose(logits, model(input_ids=batch).logits.float(), atol=1e-5)


def test_hidden_distillation_is_zero_for_the_full_model_and_pulls_gates_towards_it():
    model, hybrid, z = _gated()
    batch, labels = _batch(length=40)
    obj = objectives.get_objective("distill-hidden")
    hybrid.set_gates(torch.ones(4, 2))
    assert obj.loss(model, hybrid, batch, labels).item() == pytest.approx(0.0, abs=1e-10)
    hybrid.set_gates(z)
    loss = obj.loss(model, hybrid, batch, labels)
    (grad,) = torch.autograd.grad(loss, z)
    assert loss.item() > 0
    assert hybrid.z is z  # the teacher pass restores the gates
    # Closing a gate moves the model away from the teacher: the gradient says "open" (dL/dz < 0) overall.
    assert grad.sum() < 0
