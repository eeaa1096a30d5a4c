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
from consa.core.errors import UnsupportedModelError
from consa.export.duo_format import read_duo_tsv, write_duo_pattern, write_duo_tsv
from consa.export.checkpoint import export_hybrid, pack_checkpoint
from consa.model.hybrid_attention import apply_allocation
from consa.core.manifest import Allocation

WINDOW = 6
LAYER = [[True, True], [False, False], [True, True], [False, False]]
KV_HEAD = [[True, False], [False, True], [False, False], [True, True]]


def allocation(pattern, granularity, sink_tokens=0, model="tiny"):
    return Allocation.from_full_mask(torch.tensor(pattern), model=model, granularity=granularity, window=WINDOW,
                                     sink_tokens=sink_tokens)


def hybrid_logits(model_type, alloc, ids, **config):
    """consa's own hybrid forward on a fresh copy of the original model."""
    model = tiny.build_model(model_type, **config)
    apply_allocation(model, alloc)
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(1, 300, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("model_type", ["qwen3", "qwen2"])
def test_layer_export_runs_in_stock_transformers(tmp_path, model_type, tokenizer):
    alloc = allocation(LAYER, "layer")
    summary = export_hybrid(tiny.build_model(model_type), alloc, tmp_path / "ckpt", tokenizer=tokenizer)
    assert summary["format"] == "layer_types"
    assert "--model-impl transformers" in summary["message"]  # the engines that would silently ignore it
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


def test_layer_export_says_when_it_falls_back(tmp_path):
    alloc = allocation(LAYER, "layer")
    biased = dict(attention_bias=True)  # Ministral, the Llama with layer_types, has no biases
    with pytest.warns(UserWarning, match="biases"):
        summary = export_hybrid(tiny.build_model("llama", **biased), alloc, tmp_path / "auto")
    assert summary["format"] == "consa" and "consa.load_hybrid" in summary["message"]
    with pytest.raises(UnsupportedModelError, match="biases"):
        export_hybrid(tiny.build_model("llama", **biased), alloc, tmp_path / "strict", layer_format="layer_types")
    with torch.no_grad():
        got = consa.load_hybrid(tmp_path / "auto")(input_ids=IDS).logits
    torch.testing.assert_close(got, hybrid_logits("llama", alloc, IDS, **biased), atol=1e-5, rtol=1e-4)


def test_export_from_path_with_finetune(tmp_path, tiny_model_dir):
    alloc = allocation(KV_HEAD, "kv_head", model=str(tiny_model_dir))
    data = torch.randint(1, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    summary = export_hybrid(str(tiny_model_dir), alloc, tmp_path / "ckpt", finetune_steps=2, data=data, lr=1e-2)
    assert summary["tokenizer"] and summary["finetune_steps"] == 2
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir).model.layers[0].self_attn.q_proj.weight
    after = consa.load_hybrid(tmp_path / "ckpt").model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(before, after)  # the weights were trained
    packed = pack_checkpoint(tmp_path / "ckpt")
    assert packed.name == "ckpt.tar" and packed.read_bytes()[:2] != b"\x1f\x8b"  # not gzip: weights barely shrink
    with tarfile.open(packed, "r:") as tar:
        names = tar.getnames()
    assert "ckpt/config.json" in names and "ckpt/model.safetensors" in names and "ckpt/manifest.json" in names


def _tensor_dtypes(directory):
    from safetensors import safe_open

    dtypes = set()
    for f in directory.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            dtypes |= {st.get_slice(k).get_dtype() for k in st.keys()}
    return dtypes


def test_export_keeps_the_source_dtype_and_shards(tmp_path):
    source = tiny.save_tiny(tmp_path / "bf16", model_type="qwen3")
    bf16 = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    bf16.save_pretrained(source)  # the source checkpoint is bf16 on disk
    alloc = allocation(KV_HEAD, "kv_head", model=str(source))
    # from the path: loaded and written in bf16, in shards as transformers writes them
    summary = export_hybrid(str(source), alloc, tmp_path / "from-path", max_shard_size="20KB")
    assert summary["dtype"] == "bfloat16" and _tensor_dtypes(tmp_path / "from-path") == {"BF16"}
    assert (tmp_path / "from-path" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "from-path").glob("model-*.safetensors"))) > 1
    # from a model the search held in fp32: written back in the source's bf16, the caller's copy untouched
    held = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    export_hybrid(held, alloc, tmp_path / "from-fp32")
    assert _tensor_dtypes(tmp_path / "from-fp32") == {"BF16"} and next(held.parameters()).dtype == torch.float32
    size = sum(f.stat().st_size for f in (tmp_path / "from-fp32").glob("*.safetensors"))
    assert size < sum(p.numel() for p in held.parameters()) * 2.5  # ~2 bytes a weight, not 4
    loaded = consa.load_hybrid(tmp_path / "from-path")
    assert next(loaded.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        want = consa.load_hybrid(tmp_path / "from-fp32")(input_ids=IDS).logits
        torch.testing.assert_close(loaded(input_ids=IDS).logits, want)


def load_attn_pattern(attn_load_dir):
    """DuoAttention's own reader (duo_attn/utils.py), re-implemented faithfully: numpy + config.json."""
    import os

    import numpy as np

    full_attention_heads = np.loadtxt(os.path.join(attn_load_dir, "full_attention_heads.tsv"), dtype=float,
                                      delimiter="\t")
    full_attention_heads = np.clip(full_attention_heads, 0, 1)
    config = json.load(open(os.path.join(attn_load_dir, "config.json")))
    return full_attention_heads, config["sink_size"], config["recent_size"]


def test_duo_pattern_folder_reads_in_duoattention_and_back(tmp_path):
    alloc = allocation(KV_HEAD, "kv_head", sink_tokens=4)
    out = write_duo_pattern(alloc, tmp_path / "new" / "pattern")  # a new directory, created
    heads, sink_size, recent_size = load_attn_pattern(out)
    assert heads.tolist() == alloc.full_mask().float().tolist() and (sink_size, recent_size) == (4, WINDOW)
    back = read_duo_tsv(out)  # window and sinks from the folder's config.json
    assert back.assignment == alloc.assignment and (back.window, back.sink_tokens) == (WINDOW, 4)


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


def test_cli_duo_export_and_import_round_trip(tmp_path, capsys):
    from consa.cli import main

    alloc = allocation(KV_HEAD, "kv_head", sink_tokens=2)
    alloc.save(tmp_path / "manifest.json")
    assert main(["export", "--model", "unused", "--allocation", str(tmp_path / "manifest.json"),
                 "--out", str(tmp_path / "new-dir"), "--format", "duo"]) == 0
    assert (tmp_path / "new-dir").is_dir() and load_attn_pattern(tmp_path / "new-dir")[1:] == (2, WINDOW)
    assert main(["import-duo", str(tmp_path / "new-dir"), "--out", str(tmp_path / "back.json")]) == 0
    back = consa.load_allocation(tmp_path / "back.json")
    assert back.assignment == alloc.assignment and (back.window, back.sink_tokens) == (WINDOW, 2)


def test_version_flag(capsys):
    from consa.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"consa {consa.__version__}"


@pytest.mark.parametrize("pattern,granularity", [(LAYER, "layer"), (KV_HEAD, "kv_head")])
def test_an_export_is_refused_where_a_base_model_is_meant(tmp_path, tokenizer, pattern, granularity):
    """A layer export's sliding layers sit in its config, out of the gates' reach: consa's "full" on it
    is not full (checked below), so searching, comparing or re-exporting it is refused with a clear
    error; consa.load_hybrid still reads it."""
    from consa.core.config import SearchConfig
    from consa.core.errors import ModelLoadError
    from consa.model.loading import load_model
    from consa.model.sharding import load_for_search

    alloc = allocation(pattern, granularity)
    export_hybrid(tiny.build_model("qwen3"), alloc, tmp_path / "ckpt", tokenizer=tokenizer)
    for load in (lambda: load_model(str(tmp_path / "ckpt")),
                 lambda: load_for_search(SearchConfig(model=str(tmp_path / "ckpt"), sparsity=0.5), "cpu"),
                 lambda: export_hybrid(str(tmp_path / "ckpt"), alloc, tmp_path / "again")):
        with pytest.raises(ModelLoadError, match="'ckpt' is a consa export") as info:
            load()
        assert str(tmp_path) not in str(info.value)  # no server path in what a job's user reads
    assert consa.load_hybrid(tmp_path / "ckpt").consa_allocation.assignment == alloc.assignment
    if granularity == "layer":  # why: under an all-full allocation the stock export still slides
        stock = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
        apply_allocation(stock, Allocation.from_full_mask(torch.ones(4, 2, dtype=torch.bool), model="tiny",
                                                          granularity="layer", window=WINDOW))
        with torch.no_grad():
            assert (stock(input_ids=IDS).logits - tiny.build_model("qwen3")(input_ids=IDS).logits).abs().max() > 1e-3
