"""A search whose gates never reached the target says so: in the manifest, as an event, on stderr."""

import json
import subprocess
import sys

import pytest

from consa.core.config import SearchConfig
from consa.search.convergence import convergence_warning
from consa.recipe.pipeline import run_allocation


@pytest.mark.parametrize("s_hat,needs", [(0.025, "--steps 2000"), (0.0, "did not move"), (0.7, "lower --lr")])
def test_far_from_the_target_is_a_warning_with_advice(s_hat, needs):
    warning = convergence_warning(0.5, s_hat, steps=100)
    assert warning and f"{s_hat:.3f}" in warning and needs in warning


def test_close_to_the_target_is_quiet():
    assert convergence_warning(0.5, 0.49, steps=100) is None and convergence_warning(0.5, None, 10) is None


def test_a_short_search_warns_in_the_manifest_and_as_an_event(tiny_model_dir, text_dir, tmp_path):
    # init_log_alpha high and 2 steps: the gates cannot move far enough to reach 0.5
    config = SearchConfig(model=str(tiny_model_dir), sparsity=0.5, window=8, dataset=str(text_dir), seq_len=64,
                          steps=2, lr=0.01)
    events = []
    run = run_allocation(config, tmp_path, heatmap=False, on_event=lambda type, message: events.append((type, message)))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert "did not reach the target" in manifest["training"]["warning"]
    assert any(t == "warning" and "did not reach the target" in m for t, m in events)
    assert run.search.allocation.sparsity_achieved == 0.5  # the count is still exact


def test_consa_search_prints_the_warning(tiny_model_dir, text_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "consa.cli", "search", "--model", str(tiny_model_dir),
                           "--sparsity", "0.5", "--window", "8", "--data", str(text_dir), "--seq-len", "64",
                           "--steps", "2", "--lr", "0.01", "--no-heatmap", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "warning: the gates did not reach the target" in proc.stderr
