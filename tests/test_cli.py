"""`consa eval`, `consa compare` and `consa export` as a user runs them."""

import json
import subprocess
import sys

import pytest
import torch

from consa.core.manifest import Allocation, load_allocation
from consa.model.loading import load_model

pytestmark = pytest.mark.slow  # live servers or CLI subprocesses: out of the fast loop (pytest -m 'not slow'); CI runs it


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "consa.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def manifest(tiny_model_dir, tmp_path_factory):
    full = torch.tensor([[True, False], [False, True], [True, True], [False, False]])
    alloc = Allocation.from_full_mask(full, model=str(tiny_model_dir), granularity="kv_head", window=16,
                                      sparsity_target=0.5)
    return alloc.save(tmp_path_factory.mktemp("alloc") / "manifest.json")


def test_eval_prints_the_loss_of_the_model_under_the_allocation(tiny_model_dir, text_dir, manifest):
    proc = _cli("eval", "--model", tiny_model_dir, "--allocation", manifest, "--data", text_dir, "--seq-len", 64,
                "--num-sequences", 3)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    full = json.loads(_cli("eval", "--model", tiny_model_dir, "--data", text_dir, "--seq-len", 64,
                           "--num-sequences", 3).stdout)
    assert report["loss"] > 0 and report["loss"] != full["loss"]
    assert report["kv_bytes_ratio"] < 1 and full["kv_bytes_ratio"] == 1

    # the unmodified model's loss is the model's own loss on the same rows
    from consa.core.data import iter_texts, pack_tokens

    model, tokenizer = load_model(str(tiny_model_dir))
    rows = pack_tokens(tokenizer, iter_texts(text_dir), 64, max_sequences=3)
    with torch.no_grad():
        assert full["loss"] == pytest.approx(model(input_ids=rows, labels=rows).loss.item(), rel=1e-4)


def test_compare_writes_a_table_and_heatmaps(tiny_model_dir, text_dir, manifest, tmp_path):
    proc = _cli("compare", "--model", tiny_model_dir, "--allocation", manifest, "--baselines", "bottom,random",
                "--data", text_dir, "--seq-len", 64, "--num-sequences", 2, "--retrieval-docs", 0, "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr
    table = (tmp_path / "comparison.md").read_text()
    assert "| full |" in table and "bottom" in table and "random" in table
    for png in ("bottom.png", "random.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = json.loads((tmp_path / "comparison.json").read_text())
    assert {r["sparsity"] for r in records if r["name"] != "full"} == {0.5}


@pytest.mark.slow
def test_export_writes_a_checkpoint_and_a_duo_tsv(tiny_model_dir, manifest, tmp_path):
    proc = _cli("export", "--model", tiny_model_dir, "--allocation", manifest, "--out", tmp_path / "ckpt")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["format"] == "consa"
    assert (tmp_path / "ckpt" / "config.json").exists()
    proc = _cli("export", "--model", tiny_model_dir, "--allocation", manifest, "--out", tmp_path / "duo",
                "--format", "duo-tsv")
    assert proc.returncode == 0, proc.stderr
    rows = [line.split("\t") for line in (tmp_path / "duo" / "full_attention_heads.tsv").read_text().split("\n") if line]
    assert rows == [["1", "0"], ["0", "1"], ["1", "1"], ["0", "0"]]
    assert load_allocation(manifest).sparsity_achieved == 0.5


def test_eval_with_a_missing_manifest_is_a_clear_error(tiny_model_dir, text_dir, tmp_path):
    proc = _cli("eval", "--model", tiny_model_dir, "--allocation", tmp_path / "none.json", "--data", text_dir)
    assert proc.returncode == 2 and "manifest not found" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_generate_streams_a_continuation_and_reports_the_cache_at_the_floor(tiny_model_dir, manifest, tmp_path):
    assert _cli("export", "--model", tiny_model_dir, "--allocation", manifest, "--out", tmp_path / "ckpt").returncode == 0
    proc = subprocess.run([sys.executable, "-m", "consa.cli", "generate", "--model", str(tmp_path / "ckpt"),
                           "--max-new-tokens", "24"], input="def main():\n    return", capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()  # the streamed continuation
    summary = proc.stderr.strip().splitlines()[-1]
    assert summary.startswith("24 tokens in"), summary
    tokens = int(summary.split("KV cache after ")[1].split()[0])
    ratio = float(summary.rsplit("(", 1)[1].rstrip(")"))
    window = load_allocation(manifest).window
    assert tokens > window and abs(ratio - (0.5 + 0.5 * window / tokens)) < 1e-3  # (1 - s) + s * W / L


def test_generate_refuses_bad_input_in_one_line(tiny_model_dir, manifest, tmp_path):
    proc = _cli("generate", "--model", tiny_model_dir, "--prompt", "x")
    assert proc.returncode == 2 and "not a consa hybrid checkpoint" in proc.stderr and "Traceback" not in proc.stderr
    proc = _cli("generate", "--model", tiny_model_dir, "--prompt", "x", "--max-new-tokens", "0")
    assert proc.returncode == 2 and "--max-new-tokens must be at least 1" in proc.stderr
