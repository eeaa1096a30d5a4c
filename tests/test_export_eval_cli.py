"""`consa eval --model DIR` on a directory `consa export` wrote: a kv_head export names remote code in its
auto_map, so a plain from_pretrained would refuse it; consa eval loads it as the hybrid it is and scores it
under the allocation it carries."""

import json
import subprocess
import sys

import pytest
import torch

from consa.core.manifest import Allocation
from consa.evaluation.metrics import build_eval_set, evaluate
from consa.export.checkpoint import export_hybrid
from consa.model.loading import load_model

pytestmark = pytest.mark.slow  # CLI subprocesses: out of the fast loop

FULL = [[True, False], [False, True], [True, True], [False, False]]


def _eval(*args):
    return subprocess.run([sys.executable, "-m", "consa.cli", "eval", *map(str, args)], capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)  # a remote-code prompt would fail


def test_eval_of_a_kv_head_export_gives_the_in_memory_hybrids_loss(tiny_model_dir, text_dir, tmp_path):
    model, tokenizer = load_model(str(tiny_model_dir))
    alloc = Allocation.from_full_mask(torch.tensor(FULL), model=str(tiny_model_dir), granularity="kv_head", window=16)
    assert export_hybrid(model, alloc, tmp_path / "ckpt", tokenizer=tokenizer)["format"] == "consa"

    proc = _eval("--model", tmp_path / "ckpt", "--data", text_dir, "--seq-len", 64, "--num-sequences", 3)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "custom code" not in proc.stdout + proc.stderr
    report = json.loads(proc.stdout)

    rows = build_eval_set(tokenizer, text_dir, seq_len=64, num_sequences=3, retrieval_docs=0, seed=0)
    want = evaluate(model, tokenizer, alloc, data=rows)
    full = evaluate(model, tokenizer, None, data=rows)
    assert report["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert report["loss"] != pytest.approx(full["loss"], rel=1e-4)  # the export's gates, not full attention
    assert (report["window"], report["sparsity"], report["kv_bytes_ratio"]) == (16, 0.5, want["kv_bytes_ratio"])
    assert report["kv_bytes_ratio"] < 1

    # --allocation still wins over the one the export carries: all full attention gives the full loss
    every = Allocation.from_full_mask(torch.ones(4, 2, dtype=torch.bool), model=str(tiny_model_dir),
                                      granularity="kv_head", window=16)
    proc = _eval("--model", tmp_path / "ckpt", "--allocation", every.save(tmp_path / "full.json"), "--data", text_dir,
                 "--seq-len", 64, "--num-sequences", 3)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["loss"] == pytest.approx(full["loss"], rel=1e-5)
