"""bench/train_testbed.py: the model it writes out is transformers' Qwen3 (same logits once saved and
loaded), its SWA mask is consa's rule, and a toy run on the CPU writes a loadable testbed."""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import train_testbed as tt  # noqa: E402

TOY = ["--layers", "2", "--hidden", "32", "--ff", "64", "--head-dim", "16", "--heads", "4", "--kv-heads", "2"]


def test_saved_weights_give_transformers_qwen3_the_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    a = tt.parse_args(["--out", str(tmp_path), "--steps", "1", "--seq-len", "64", *TOY])
    torch.manual_seed(0)
    model = tt.Qwen3LM(a, 8192)
    with torch.no_grad():
        for p in model.parameters():  # norms away from 1; bf16-exact so the saved copy is the same model
            p.add_(torch.randn_like(p) * 0.05).copy_(p.to(torch.bfloat16).float())
    files = tt.save_hf(model, a, 8192, tmp_path, shards=3)
    assert len(files) == 3 and json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="sdpa")
    ids = torch.randint(0, 8192, (2, 48))
    with torch.no_grad():
        assert torch.allclose(model(ids), hf(input_ids=ids).logits, atol=1e-4)


def test_swa_mask_is_consas_window_rule():
    from consa.core.window import swa_visible

    i = torch.arange(40)
    assert torch.equal(tt.swa_mask(40, 7, "cpu"), swa_visible(i[:, None], i[None, :], 7))


@pytest.mark.slow
def test_toy_run_writes_a_loadable_testbed(tmp_path):
    stdlib = Path(os.__file__).parent
    data, held = tmp_path / "data", tmp_path / "held"
    data.mkdir()
    held.mkdir()
    for name in ("argparse.py", "typing.py"):
        shutil.copy(stdlib / name, data / name)
    shutil.copy(stdlib / "inspect.py", held / "inspect.py")
    out = tmp_path / "out"
    record = tt.main(["--out", str(out), "--data", str(data), "--eval-data", str(held), *TOY, "--seq-len", "256",
                      "--seq-schedule", "128:0.5", "--batch", "2", "--steps", "3", "--warmup", "1",
                      "--retrieval-ratio", "0.5", "--tok-workers", "1", "--val-rows", "1", "--eval-rows", "1",
                      "--eval-docs", "2", "--eval-windows", "32,64", "--no-compile"])
    assert record["steps"] == 3 and [r["seq"] for r in record["curve"]] == [128, 128, 256]
    assert record["retrieval_rows"] > 0
    assert set(record["eval"]) >= {"full@32", "all_swa@32", "all_swa@64"}
    # SWA changes nothing inside the window
    assert record["eval"]["full@32"]["loss_pos_lt_window"] == pytest.approx(
        record["eval"]["all_swa@32"]["loss_pos_lt_window"], abs=1e-5)
    assert (out / "testbed_eval.json").exists() and (out / "config.json").exists()
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out)
    assert hf.config.num_hidden_layers == 2 and hf.config.num_key_value_heads == 2
