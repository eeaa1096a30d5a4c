"""The search end to end on CPU, through the library and through `consa search`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from consa.core.errors import Cancelled, DataError, ModelLoadError
from consa.model.hybrid_attention import install
from consa.model.loading import load_model
from consa.core.manifest import load_allocation
from consa.search.objectives import get_objective
from consa.search.loop import SearchConfig, load_gate_state, run_search, save_gate_state


def _config(model_dir, data_dir, **kw):
    base = dict(model=str(model_dir), sparsity=0.5, granularity="kv_head", window=8, dataset=str(data_dir),
                seq_len=64, steps=12, batch_size=2)
    return SearchConfig(**{**base, **kw})


@pytest.mark.parametrize("granularity,sparsity", [("kv_head", 0.5), ("kv_head", 0.375), ("layer", 0.25),
                                                  ("layer", 1.0), ("kv_head", 0.0)])
def test_search_reaches_the_exact_sparsity(tiny_model_dir, text_dir, granularity, sparsity):
    seen = []
    result = run_search(_config(tiny_model_dir, text_dir, granularity=granularity, sparsity=sparsity),
                        progress=seen.append)
    alloc = result.allocation
    units = 4 if granularity == "layer" else 8
    assert alloc.sparsity_achieved == round(sparsity * units) / units
    assert [r["step"] for r in seen] == list(range(1, 13))
    assert {"loss", "sparsity", "target", "lambda1", "lambda2"} <= set(seen[-1])
    assert seen[-1]["target"] == pytest.approx(sparsity)
    if granularity == "layer":
        assert all(len(set(row)) == 1 for row in alloc.assignment)


def test_gate_momentum_reaches_the_optimizer(tiny_model_dir, text_dir):
    """A setting end to end: the same run with more momentum moves the gates differently."""
    calm = run_search(_config(tiny_model_dir, text_dir, steps=6))
    eager = run_search(_config(tiny_model_dir, text_dir, steps=6, gate_momentum=0.9))
    assert eager.allocation.training["gate_momentum"] == 0.9
    assert not torch.allclose(calm.gate_state["log_alpha"], eager.gate_state["log_alpha"])


def test_search_is_seedable(tiny_model_dir, text_dir):
    a = run_search(_config(tiny_model_dir, text_dir, seed=3))
    b = run_search(_config(tiny_model_dir, text_dir, seed=3))
    assert torch.equal(a.gate_state["log_alpha"], b.gate_state["log_alpha"])
    assert a.allocation.assignment == b.allocation.assignment


def test_distill_objective_and_retrieval_mix_run(tiny_model_dir, text_dir):
    result = run_search(_config(tiny_model_dir, text_dir, objective="distill", seq_len=160, retrieval_ratio=0.5,
                                steps=4))
    assert result.allocation.method == "learned-distill"
    assert all(0 < r["loss"] < 10 for r in result.history)  # soft gates already move the student a little
    # The KL to the unmodified model: zero with every unit full, more the more units slide.
    model, _ = load_model(str(tiny_model_dir))
    hybrid = install(model, window=8)
    batch = torch.randint(1, 200, (2, 64), generator=torch.Generator().manual_seed(0))
    kl = {}
    for name, z in (("full", torch.ones(4, 2)), ("half", torch.tensor([[1.0, 0.0]] * 4)), ("swa", torch.zeros(4, 2))):
        hybrid.set_gates(z)
        kl[name] = get_objective("distill").loss(model, hybrid, batch, batch).item()
    assert kl["full"] == pytest.approx(0.0, abs=1e-6)
    assert 0 < kl["half"] < kl["swa"]


def test_cancel_hook_stops_the_search(tiny_model_dir, text_dir):
    calls = []

    def should_cancel():
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(Cancelled, match="step 3"):
        run_search(_config(tiny_model_dir, text_dir), should_cancel=should_cancel)


@pytest.mark.slow
def test_a_stopped_search_resumes_from_its_checkpoint_exactly(tiny_model_dir, text_dir, tmp_path):
    """Stopped after its step-4 checkpoint, a search continues from there and ends where an
    uninterrupted one does: same gates, multipliers and allocation (restarting would not)."""
    config = _config(tiny_model_dir, text_dir, steps=12)
    whole = run_search(config)
    saved = []

    def stop_after_the_checkpoint():
        return bool(saved)

    with pytest.raises(Cancelled):
        run_search(config, checkpoint_every=4, should_cancel=stop_after_the_checkpoint,
                   on_checkpoint=lambda state: saved.append(save_gate_state(state, tmp_path / "state.safetensors")))
    state = load_gate_state(saved[-1])
    assert state["step"] == 4 and {"exp_avg", "exp_avg_sq", "adam_step", "lambda1", "lambda2"} <= set(state)
    resumed = run_search(config, resume_from=saved[-1])
    assert [r["step"] for r in resumed.history] == list(range(5, 13))
    assert {r["start_step"] for r in resumed.history} == {4} and whole.history[0]["start_step"] == 0
    assert torch.allclose(resumed.gate_state["log_alpha"], whole.gate_state["log_alpha"], atol=1e-6)
    assert resumed.gate_state["lambda1"] == pytest.approx(whole.gate_state["lambda1"])
    assert resumed.allocation.assignment == whole.allocation.assignment
    # The optimizer's moments are part of the state: without them the same 8 steps end elsewhere.
    no_moments = {k: v for k, v in state.items() if k not in ("exp_avg", "exp_avg_sq", "adam_step")}
    forgetful = run_search(config, resume_from=no_moments)
    assert not torch.allclose(forgetful.gate_state["log_alpha"], whole.gate_state["log_alpha"], atol=1e-4)


def test_the_final_gates_file_continues_a_longer_search(tiny_model_dir, text_dir, tmp_path):
    first = run_search(_config(tiny_model_dir, text_dir, steps=12))
    first.save(tmp_path)
    state = load_gate_state(tmp_path / "gates.safetensors")
    assert torch.equal(state["log_alpha"], first.gate_state["log_alpha"]) and state["step"] == 12
    resumed = run_search(_config(tiny_model_dir, text_dir, steps=16), resume_from=tmp_path / "gates.safetensors")
    assert [r["step"] for r in resumed.history] == [13, 14, 15, 16]


def test_manifest_has_the_documented_fields(tiny_model_dir, text_dir, tmp_path):
    run_search(_config(tiny_model_dir, text_dir)).save(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    for key in ("format", "model", "granularity", "num_layers", "num_kv_heads", "window", "sink_tokens",
                "sparsity_target", "sparsity_achieved", "assignment", "gate_prob_full", "training"):
        assert key in manifest, key
    assert manifest["format"] == "consa.allocation/v1"
    assert (manifest["num_layers"], manifest["num_kv_heads"]) == (4, 2)
    assert manifest["training"]["steps"] == 12 and manifest["training"]["objective"] == "lm"
    assert load_allocation(tmp_path).assignment == manifest["assignment"]


@pytest.mark.parametrize("field,value,message", [
    ("sparsity", 1.5, "sparsity must be in"), ("sparsity", -0.1, "sparsity must be in"),
    ("window", 0, "window must be"), ("granularity", "block", "unknown granularity"),
    ("objective", "rl", "unknown objective"), ("steps", 0, "steps must be"),
])
def test_bad_settings_are_refused(tiny_model_dir, text_dir, field, value, message):
    with pytest.raises(ValueError, match=message):
        _config(tiny_model_dir, text_dir, **{field: value})


def test_unknown_model_and_data_give_user_errors(tiny_model_dir, text_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="cannot load model"):
        run_search(_config(tmp_path / "nope", text_dir))
    with pytest.raises(DataError, match="does not exist"):
        run_search(_config(tiny_model_dir, tmp_path / "missing"))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "consa.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_cli_search_writes_an_exact_manifest(tiny_model_dir, text_dir, tmp_path):
    out = tmp_path / "run"
    proc = _cli("search", "--model", tiny_model_dir, "--sparsity", 0.5, "--granularity", "kv_head", "--window", 8,
                "--data", text_dir, "--seq-len", 64, "--steps", 10, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["sparsity_achieved"] == 0.5
    assert "search" in proc.stderr and "10/10" in proc.stderr  # the progress bar
    manifest = load_allocation(out / "manifest.json")
    assert sum(v == "swa" for row in manifest.assignment for v in row) == 4
    assert (out / "gates.safetensors").stat().st_size > 0


@pytest.mark.parametrize("args,message", [
    (["--sparsity", "1.5"], "sparsity must be in [0, 1]"),
    (["--sparsity", "0.5", "--window", "0"], "window must be"),
    (["--sparsity", "0.5", "--granularity", "block"], "unknown granularity"),
])
def test_cli_bad_input_is_a_clear_error(tiny_model_dir, text_dir, tmp_path, args, message):
    proc = _cli("search", "--model", tiny_model_dir, "--data", text_dir, "--out", tmp_path, *args)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_cli_unknown_model_and_unswappable_model(tmp_path, text_dir):
    proc = _cli("search", "--model", tmp_path / "nope", "--sparsity", 0.5, "--data", text_dir, "--out", tmp_path)
    assert proc.returncode == 2 and "cannot load model" in proc.stderr and "Traceback" not in proc.stderr

    from transformers import AutoModelForCausalLM, BloomConfig

    import tiny

    bloom = tmp_path / "bloom"
    AutoModelForCausalLM.from_config(BloomConfig(vocab_size=300, hidden_size=16, n_layer=2, n_head=2)).save_pretrained(bloom)
    tiny.build_tokenizer().save_pretrained(bloom)
    proc = _cli("search", "--model", bloom, "--sparsity", 0.5, "--data", text_dir, "--seq-len", 32, "--steps", 2,
                "--out", tmp_path / "o")
    assert proc.returncode == 2 and "cannot swap its attention" in proc.stderr and "Traceback" not in proc.stderr


def test_gradient_checkpointing_gives_the_same_gates(tiny_model_dir, text_dir):
    """Checkpointing trades compute for memory and must not change what is learned."""
    plain = run_search(_config(tiny_model_dir, text_dir, steps=4))
    checkpointed = run_search(_config(tiny_model_dir, text_dir, steps=4, gradient_checkpointing="on"))
    assert torch.allclose(plain.gate_state["log_alpha"], checkpointed.gate_state["log_alpha"], atol=1e-5)
    assert not torch.allclose(checkpointed.gate_state["log_alpha"], torch.full((8,), 3.0))  # the gates did learn


@pytest.mark.parametrize("seq_len,window,expected", [(4096, 256, 0.25), (1024, 256, 0.25), (512, 256, 0.0),
                                                     (256, 16, 0.0), (64, 8, 0.0)])
def test_retrieval_mix_defaults_to_the_benchmarked_share_where_documents_reach_past_the_window(seq_len, window, expected):
    config = SearchConfig(model="m", sparsity=0.5, seq_len=seq_len, window=window)
    assert config.retrieval_ratio == expected
    assert SearchConfig(model="m", sparsity=0.5, seq_len=seq_len, window=window, retrieval_ratio=0.1).retrieval_ratio == 0.1


def test_checkpointing_setting_auto_follows_the_memory_estimate(tiny_model_dir, text_dir, monkeypatch):
    from consa.search import memory

    monkeypatch.setattr(memory, "free_bytes", lambda device: 1024)  # nothing fits: must checkpoint
    tight = run_search(_config(tiny_model_dir, text_dir, steps=2))
    assert tight.allocation.training["activation_checkpointing"] is True
    layers = json.loads((Path(tiny_model_dir) / "config.json").read_text())["num_hidden_layers"]
    assert tight.allocation.training["checkpointed_layers"] == layers  # nothing fits: every layer
    assert tight.allocation.training["checkpoint_keeps_attention"] is False
    assert tight.allocation.training["gradient_checkpointing"] == "auto"
    off = run_search(_config(tiny_model_dir, text_dir, steps=2, gradient_checkpointing="off"))
    assert off.allocation.training["activation_checkpointing"] is False
    assert off.allocation.training["checkpointed_layers"] == 0
    with pytest.raises(ValueError, match="gradient checkpointing True: expected one of auto, on, off"):
        SearchConfig(model="m", sparsity=0.5, gradient_checkpointing=True)  # the old on/off flag is gone


def _out_of_memory_on(monkeypatch, calls: set):
    """The LM objective runs out of device memory on the given calls (counted from 1), as a GPU would."""
    from consa.search.objectives import NextTokenLoss

    real, count = NextTokenLoss.loss, [0]

    def loss(self, *args):
        count[0] += 1
        if count[0] in calls:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, *args)

    monkeypatch.setattr(NextTokenLoss, "loss", loss)


def test_a_step_out_of_memory_is_redone_with_every_layer_checkpointed(tiny_model_dir, text_dir, monkeypatch):
    reference = run_search(_config(tiny_model_dir, text_dir, steps=4, gradient_checkpointing="off"))
    _out_of_memory_on(monkeypatch, {2})  # step 1's forward
    with pytest.warns(UserWarning, match="out of device memory at step 1"):
        recovered = run_search(_config(tiny_model_dir, text_dir, steps=4, gradient_checkpointing="off"))
    layers = json.loads((Path(tiny_model_dir) / "config.json").read_text())["num_hidden_layers"]
    training = recovered.allocation.training
    assert training["checkpointed_layers"] == layers and training["checkpointing_replanned_at_step"] == 1
    # The same rows and noise, no step lost or taken twice: the very gates of the search that never failed.
    torch.testing.assert_close(recovered.gate_state["log_alpha"], reference.gate_state["log_alpha"])
    assert [r["step"] for r in recovered.history] == [1, 2, 3, 4]


def test_out_of_memory_with_every_layer_checkpointed_is_the_jobs_error(tiny_model_dir, text_dir, monkeypatch):
    _out_of_memory_on(monkeypatch, {1, 2})
    with pytest.raises(torch.OutOfMemoryError), pytest.warns(UserWarning):
        run_search(_config(tiny_model_dir, text_dir, steps=2, gradient_checkpointing="on"))


@pytest.mark.parametrize("objective", ["distill", "distill-hidden"])
def test_distillation_objectives_reach_the_exact_sparsity(tiny_model_dir, text_dir, objective):
    result = run_search(_config(tiny_model_dir, text_dir, objective=objective, steps=6))
    assert result.allocation.sparsity_achieved == 0.5
    assert result.allocation.method == f"learned-{objective}"
