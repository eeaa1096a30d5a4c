"""A consa-format checkpoint (KV-head hybrid, or a layer hybrid no stock config expresses) never runs
as plain full attention in stock transformers: without trust_remote_code it is refused, with it the
shipped modeling file installs consa's hybrid; without consa installed that file says what to do."""

import json
import os
import subprocess
import sys

import pytest
import tiny
import torch

import consa
from consa.export.checkpoint import REMOTE_MODELING, export_hybrid
from consa.model.hybrid_attention import apply_allocation
from consa.core.manifest import Allocation

IDS = torch.randint(1, 300, (2, 24), generator=torch.Generator().manual_seed(0))
KV_HEAD = [[True, False], [False, True], [False, False], [True, True]]
LAYER = [[True, True], [False, False], [True, True], [False, False]]

STOCK = """
import contextlib, io, json, logging, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path, out = sys.argv[1], {}
ids = torch.load(sys.argv[2])
said = []  # what transformers logs, and what it prints (the remote-code prompt goes to stdout)
logging.getLogger("transformers").addHandler(type("Keep", (logging.Handler,), {"emit": lambda h, r: said.append(r.getMessage())})())
try:  # a plain load, as a user or a serving tool would write it
    AutoModelForCausalLM.from_pretrained(path)
    out["plain"] = "loaded"
except ValueError as e:
    out["plain"] = str(e)
sys.modules["consa"] = None  # consa not installed
try:
    AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    out["no_consa"] = "loaded"
except ImportError as e:
    out["no_consa"] = str(e)
said.clear()
with contextlib.redirect_stdout(io.StringIO()) as printed:  # the tokenizer needs no consa
    out["tokenizer"] = AutoTokenizer.from_pretrained(path, trust_remote_code=True)("def f(x):").input_ids
out["tokenizer_said"] = said[:] + [printed.getvalue()]
del sys.modules["consa"]
said.clear()
m = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
out["model_said"] = said[:]
with torch.no_grad():
    torch.save(m(input_ids=ids).logits, sys.argv[3])
    out["generated"] = m.generate(ids[:1, :10], max_new_tokens=4, min_new_tokens=4, do_sample=False).shape[1]
out["attn"] = m.config._attn_implementation
open(sys.argv[4], "w").write(json.dumps(out))
"""


def hybrid_logits(model_type, alloc):
    model = tiny.build_model(model_type)
    apply_allocation(model, alloc)
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("model_type,pattern,granularity,sinks", [
    ("qwen3", KV_HEAD, "kv_head", 0),
    ("llama", LAYER, "layer", 2),  # sink tokens: no stock config can say it
])
@pytest.mark.slow
def test_consa_format_is_refused_plain_and_hybrid_with_remote_code(tmp_path, model_type, pattern, granularity, sinks,
                                                                   tokenizer):
    alloc = Allocation.from_full_mask(torch.tensor(pattern), model="tiny", granularity=granularity, window=6,
                                      sink_tokens=sinks)
    with pytest.warns(UserWarning) if granularity == "layer" else _no_warning():
        summary = export_hybrid(tiny.build_model(model_type), alloc, tmp_path / "ckpt", tokenizer=tokenizer)
    assert summary["format"] == "consa" and summary["model_type"] == "consa_hybrid"
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == REMOTE_MODELING[:-3] + ".ConsaHybridForCausalLM"
    assert (tmp_path / "ckpt" / REMOTE_MODELING).exists()
    torch.save(IDS, tmp_path / "ids.pt")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}  # remote code is copied there
    proc = subprocess.run([sys.executable, "-c", STOCK, str(tmp_path / "ckpt"), str(tmp_path / "ids.pt"),
                           str(tmp_path / "logits.pt"), str(tmp_path / "out.json")], capture_output=True, text=True, env=env,
                          stdin=subprocess.DEVNULL, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    assert "trust_remote_code=True" in out["plain"]  # refused, not run as full attention
    assert "pip install consa" in out["no_consa"] and "consa.load_hybrid" in out["no_consa"]
    assert out["attn"] == "consa_hybrid" and out["generated"] == 14
    # no prompt and no warning for the tokenizer (a stock one) nor for the model with remote code
    assert out["tokenizer"] == tokenizer("def f(x):").input_ids and out["tokenizer_said"] == [""]
    assert out["model_said"] == []
    want = hybrid_logits(model_type, alloc)
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), want, atol=1e-5, rtol=1e-4)
    full = tiny.build_model(model_type)(input_ids=IDS).logits
    assert (full - want).abs().max() > 1e-3  # the hybrid is not full attention
    # consa's own loader reads the same directory without running the shipped file
    with torch.no_grad():
        torch.testing.assert_close(consa.load_hybrid(tmp_path / "ckpt")(input_ids=IDS).logits, want,
                                   atol=1e-5, rtol=1e-4)


class _no_warning:
    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        return self._catch.__exit__(*exc)


def test_with_consa_imported_auto_classes_read_the_consa_format_without_a_prompt(tmp_path, tokenizer, monkeypatch):
    """consa registers model type consa_hybrid as local code: AutoTokenizer reads the directory without asking
    about remote code, and AutoModelForCausalLM builds the hybrid even without trust_remote_code."""
    import logging

    from transformers import AutoModelForCausalLM, AutoTokenizer

    alloc = Allocation.from_full_mask(torch.tensor(KV_HEAD), model="tiny", granularity="kv_head", window=6)
    export_hybrid(tiny.build_model("qwen3"), alloc, tmp_path / "ckpt", tokenizer=tokenizer)
    said = []
    keep = type("Keep", (logging.Handler,), {"emit": lambda h, r: said.append(r.getMessage())})()
    logging.getLogger("transformers").addHandler(keep)
    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("asked about remote code"))
    try:
        loaded = AutoTokenizer.from_pretrained(tmp_path / "ckpt")
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    finally:
        logging.getLogger("transformers").removeHandler(keep)
    assert loaded("def f(x):").input_ids == tokenizer("def f(x):").input_ids
    assert not [m for m in said if "custom code" in m or "instantiate a model of type" in m], said
    assert model.config._attn_implementation == "consa_hybrid"
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, hybrid_logits("qwen3", alloc), atol=1e-5, rtol=1e-4)
