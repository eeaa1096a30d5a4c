"""The memory estimate: checkpointing is chosen exactly when a step would not fit."""

import pytest
from transformers import AutoConfig

import tiny
from consa import memory

GIB = 1 << 30


def llama3_8b():
    return AutoConfig.for_model("llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8)


def test_8b_at_128k_needs_checkpointing_on_one_h200_and_fits_with_it():
    est = memory.estimate_step(llama3_8b(), seq_len=131072, batch_size=1, act_bytes=2, free=123 * GIB)
    assert not est.fits(checkpointing=False)  # ~800 GiB of saved activations
    assert est.fits(checkpointing=True)
    assert est.peak(True) < est.peak(False) / 5


def test_estimate_errs_above_the_measured_8b_step():
    """Llama-3-8B, 8k tokens: ~36 GiB of activations measured (94 GiB peak minus weights and logits)."""
    est = memory.estimate_step(llama3_8b(), seq_len=8192, batch_size=1, act_bytes=2)
    assert 36 * GIB < est.activations < 72 * GIB


@pytest.mark.parametrize("free_gib,expected", [(0.001, True), (1000, False)])
def test_auto_checkpoints_exactly_when_the_step_would_not_fit(monkeypatch, free_gib, expected):
    model = tiny.build_model()
    monkeypatch.setattr(memory, "free_bytes", lambda device: int(free_gib * GIB))
    chosen, est = memory.use_checkpointing("auto", model, seq_len=4096, batch_size=4, device="cpu")
    assert chosen is expected
    assert est.fits(False) is not expected


def test_on_and_off_are_obeyed_whatever_the_estimate(monkeypatch):
    model = tiny.build_model()
    monkeypatch.setattr(memory, "free_bytes", lambda device: 1)
    assert memory.use_checkpointing("off", model, 4096, 4, "cpu")[0] is False
    monkeypatch.setattr(memory, "free_bytes", lambda device: 1 << 50)
    assert memory.use_checkpointing("on", model, 4096, 4, "cpu")[0] is True


def test_unknown_free_memory_never_forces_checkpointing():
    est = memory.estimate_step(llama3_8b(), seq_len=131072, batch_size=1, free=None)
    assert est.fits(False)
