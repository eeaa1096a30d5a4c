"""The tokenizer and the model of a kv_head export, loaded by stock transformers in a fresh interpreter that
never imported consa before the tokenizer, with stdin closed (a remote-code prompt cannot be answered).

Pins what docs/EXPORT.md ("The tokenizer of a consa-format export") says: with trust_remote_code=True
the tokenizer loads with no prompt and no warning; a plain AutoTokenizer.from_pretrained(DIR) still
prints the remote-code prompt (AutoTokenizer reads the model config first, and model type consa_hybrid
is remote code there), then falls back to the same stock tokenizer; the model loads with no warning."""

import json
import os
import subprocess
import sys

import pytest
import tiny
import torch

from consa.core.manifest import Allocation
from consa.export.checkpoint import export_hybrid

pytestmark = pytest.mark.slow  # a subprocess: out of the fast loop

KV_HEAD = [[True, False], [False, True], [False, False], [True, True]]
PROMPT = "Do you wish to run the custom code"
SPURIOUS = "to instantiate a model of type"

SCRIPT = """
import contextlib, io, json, logging, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
path, out = sys.argv[1], {}
said = []  # what transformers logs; the prompt itself goes to stdout
logging.getLogger("transformers").addHandler(type("Keep", (logging.Handler,), {"emit": lambda h, r: said.append(r.getMessage())})())

def load(name, fn):
    said.clear()
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        value = fn()
    out[name] = {"printed": printed.getvalue(), "said": said[:]}
    return value

out["trusted_ids"] = load("trusted", lambda: AutoTokenizer.from_pretrained(path, trust_remote_code=True))("def f(x):").input_ids
plain = load("plain", lambda: AutoTokenizer.from_pretrained(path))
out["plain_ids"], out["plain_class"] = plain("def f(x):").input_ids, type(plain).__module__.split(".")[0]
out["consa_before_model"] = "consa" in sys.modules
model = load("model", lambda: AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True))
out["attn"] = model.config._attn_implementation
open(sys.argv[2], "w").write(json.dumps(out))
"""


def test_kv_head_export_tokenizer_and_model_in_a_fresh_stock_process(tmp_path, tokenizer):
    alloc = Allocation.from_full_mask(torch.tensor(KV_HEAD), model="tiny", granularity="kv_head", window=6)
    export_hybrid(tiny.build_model("qwen3"), alloc, tmp_path / "ckpt", tokenizer=tokenizer)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}  # the shipped modeling file is copied there
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "ckpt"), str(tmp_path / "out.json")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, stdin=subprocess.DEVNULL, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    want = tokenizer("def f(x):").input_ids
    # trust_remote_code=True: the shipped config class only, no prompt, no warning (consa not needed)
    assert out["trusted_ids"] == want and out["trusted"] == {"printed": "", "said": []}
    # plain: the prompt transformers cannot skip for a remote-code model type (tokenization_auto.py reads the
    # model config before tokenizer_config.json), answered by EOF, then the stock tokenizer all the same
    assert PROMPT in out["plain"]["printed"] and any(SPURIOUS in m for m in out["plain"]["said"])
    assert out["plain_ids"] == want and out["plain_class"] == "transformers"
    assert not out["consa_before_model"]
    # the model with its remote code: the hybrid, and no prompt or "model of type" warning
    assert out["attn"] == "consa_hybrid"
    assert PROMPT not in out["model"]["printed"] and not [m for m in out["model"]["said"] if SPURIOUS in m], out["model"]
