"""Hybrid checkpoints: stock transformers runs layer-wise exports; load_hybrid runs every export."""

import json
import subprocess
import sys
import tarfile

import pytest
import tiny
import torch
from transformers import AutoModelForCausalLM

import consa
from consa.errors import UnsupportedModelError
from consa.export import export_hybrid, pack_checkpoint, read_duo_tsv, write_duo_tsv
from consa.hybrid_attention import apply_allocation
from consa.manifest import Allocation

WINDOW = 6
LAYER = [[True, True], [False, False], [True, True], [False, False]]
KV_HEAD = [[True, False], [False, True], [False, False], [True, True]]


def allocation(pattern, granularity, sink_tokens=0, model="tiny"):
    return Allocation.from_full_mask(torch.tensor(pattern), model=model, granularity=granularity, window=WINDOW,
                                     sink_tokens=sink_tokens)


def hybrid_logits(model_type, alloc, ids):
    """consa's own hybrid forward on a fresh copy of the original model."""
    model = tiny.build_model(model_type)
    apply_allocation(model, alloc)
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(1, 300, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("model_type", ["qwen3", "qwen2"])
def test_layer_export_runs_in_stock_transformers(tmp_path, model_type, tokenizer):
    alloc = allocation(LAYER, "layer")
    summary = export_hybrid(tiny.build_model(model_type), alloc, tmp_path / "ckpt", tokenizer=tokenizer)
    assert summary["format"] == "layer_types"
    # A fresh interpreter with no consa import: stock transformers alone must run the hybrid.
    script = (f"import torch, sys; from transformers import AutoModelForCausalLM;"
              f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'ckpt')!r}, attn_implementation='sdpa');"
              f"ids = torch.load({str(tmp_path / 'ids.pt')!r});"
              f"torch.save(m(input_ids=ids).logits, {str(tmp_path / 'logits.pt')!r});"
              f"assert 'consa' not in sys.modules")
    torch.save(IDS, tmp_path / "ids.pt")
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    stock = torch.load(tmp_path / "logits.pt")
    want = hybrid_logits(model_type, alloc, IDS)
    torch.testing.assert_close(stock, want, atol=1e-5, rtol=1e-4)
    full = tiny.build_model(model_type)(input_ids=IDS).logits
    assert (full - want).abs().max() > 1e-3  # sliding layers really change the output
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["layer_types"] == ["full_attention", "sliding_attention"] * 2 and config["sliding_window"] == WINDOW
    assert (tmp_path / "ckpt" / "tokenizer.json").exists() and (tmp_path / "ckpt" / "model.safetensors").exists()
    # load_hybrid reads the same directory and gives the same logits
    with torch.no_grad():
        torch.testing.assert_close(consa.load_hybrid(tmp_path / "ckpt")(input_ids=IDS).logits, want,
                                   atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("model_type,sinks", [("qwen3", 0), ("llama", 2)])
def test_kv_head_export_round_trips_through_load_hybrid(tmp_path, model_type, sinks):
    alloc = allocation(KV_HEAD, "kv_head", sink_tokens=sinks)
    summary = export_hybrid(tiny.build_model(model_type), alloc, tmp_path / "ckpt")
    assert summary["format"] == "consa"
    model = consa.load_hybrid(tmp_path / "ckpt")
    assert model.consa_allocation.assignment == alloc.assignment
    with torch.no_grad():
        got = model(input_ids=IDS).logits
        # and generation through the hybrid cache (load_hybrid makes it the default)
        out = model.generate(IDS[:1, :10], max_new_tokens=5, do_sample=False, min_new_tokens=5)
    torch.testing.assert_close(got, hybrid_logits(model_type, alloc, IDS), atol=1e-5, rtol=1e-4)
    assert out.shape == (1, 15)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["consa"]["allocation"]["assignment"] == alloc.assignment
    assert "layer_types" not in config or set(config["layer_types"]) == {"full_attention"}


def test_llama_layer_export_says_it_falls_back(tmp_path):
    alloc = allocation(LAYER, "layer")
    with pytest.warns(UserWarning, match="no per-layer attention types"):
        summary = export_hybrid(tiny.build_model("llama"), alloc, tmp_path / "auto")
    assert summary["format"] == "consa" and "consa.load_hybrid" in summary["message"]
    with pytest.raises(UnsupportedModelError, match="'llama'"):
        export_hybrid(tiny.build_model("llama"), alloc, tmp_path / "strict", layer_format="layer_types")
    with torch.no_grad():
        got = consa.load_hybrid(tmp_path / "auto")(input_ids=IDS).logits
    torch.testing.assert_close(got, hybrid_logits("llama", alloc, IDS), atol=1e-5, rtol=1e-4)


def test_export_from_path_with_finetune(tmp_path, tiny_model_dir):
    alloc = allocation(KV_HEAD, "kv_head", model=str(tiny_model_dir))
    data = torch.randint(1, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    summary = export_hybrid(str(tiny_model_dir), alloc, tmp_path / "ckpt", finetune_steps=2, data=data, lr=1e-2)
    assert summary["tokenizer"] and summary["finetune_steps"] == 2
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir).model.layers[0].self_attn.q_proj.weight
    after = consa.load_hybrid(tmp_path / "ckpt").model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(before, after)  # the weights were trained
    packed = pack_checkpoint(tmp_path / "ckpt")
    with tarfile.open(packed) as tar:
        names = tar.getnames()
    assert "ckpt/config.json" in names and "ckpt/model.safetensors" in names and "ckpt/manifest.json" in names


def test_duo_tsv_round_trip(tmp_path):
    alloc = allocation(KV_HEAD, "kv_head", sink_tokens=4)
    path = write_duo_tsv(alloc, tmp_path / "full_attention_heads.tsv")
    assert path.read_text().splitlines()[0] == "1\t0"
    back = read_duo_tsv(path, window=WINDOW, sink_tokens=4)
    assert back.assignment == alloc.assignment and back.window == WINDOW and back.granularity == "kv_head"
    # DuoAttention's learned gate values: binarised at a sparsity, lowest values go SWA
    (tmp_path / "soft.tsv").write_text("0.9\t0.1\n0.2\t0.8\n")
    soft = read_duo_tsv(tmp_path / "soft.tsv", window=WINDOW, sparsity=0.5)
    assert soft.assignment == [["full", "swa"], ["swa", "full"]] and soft.sparsity_achieved == 0.5
    # a uniform table reads as layer granularity when asked
    (tmp_path / "layers.tsv").write_text("1\t1\n0\t0\n")
    assert read_duo_tsv(tmp_path / "layers.tsv", window=WINDOW, granularity="layer").granularity == "layer"
