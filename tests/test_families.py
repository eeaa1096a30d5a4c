"""The README's model-family table, cell by cell: every family through search, evaluate, export (stock
`layer_types` and the consa format), load_hybrid and generate, on tiny random models on the CPU.

A "yes" in the table is a test here (test_the_readme_table_claims_only_what_is_tested checks the table
against FAMILIES and COLUMNS); the cases behind its footnotes are asserted too. Stock loads run in one
fresh interpreter that has not imported consa when it loads them.
"""

import json
import os
import re
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import tiny
import torch

import consa
from consa import SearchConfig
from consa.core.errors import UnsupportedModelError
from consa.core.manifest import Allocation
from consa.evaluation.attention_scores import far_attention_scores
from consa.evaluation.metrics import build_eval_set, evaluate
from consa.export.checkpoint import export_hybrid
from consa.model.hybrid_attention import apply_allocation, install
from consa.model.loading import load_model
from consa.runtime.cache import HybridCache
from consa.search.loop import run_search

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (conftest)

WINDOW = 8
NATIVE = ["full_attention"] * 3 + ["sliding_attention"]  # a family's own sliding layer, kept by every export
GEMMA = dict(query_pre_attn_scalar=8, sliding_window=WINDOW, layer_types=NATIVE)
SAME_ROPE = {t: {"rope_type": "default", "rope_theta": 10000.0} for t in ("full_attention", "sliding_attention")}
# README row -> (model_type, tiny config extras, the model type a stock layer export is written as)
FAMILIES = {
    "Qwen3": ("qwen3", {}, "qwen3"),
    "Qwen2": ("qwen2", {}, "qwen2"),
    "Llama": ("llama", {}, "ministral"),
    "Mistral": ("mistral", {}, "ministral"),
    "Ministral": ("ministral", {"sliding_window": WINDOW, "layer_types": NATIVE}, "ministral"),
    # soft cap 1.0 on weights 5x the default scale: ignoring the cap would move the logits by ~0.15
    "Gemma 2": ("gemma2", {**GEMMA, "attn_logit_softcapping": 1.0, "initializer_range": 0.1}, "gemma2"),
    # same RoPE for both layer types: the only Gemma 3 whose layer exports are stock (footnote)
    "Gemma 3 (text)": ("gemma3_text", {**GEMMA, "rope_parameters": SAME_ROPE}, "gemma3_text"),
    # no per-layer attention types in their configs: every export is the consa format
    "Phi-3": ("phi3", {}, None),
    "OLMo 2": ("olmo2", {}, None),
}
COLUMNS = ("search", "evaluate", "export stock", "export consa", "load_hybrid", "generate")
LAYER = [[True, True], [False, False], [True, True], [False, False]]
KV_HEAD = [[True, False], [False, True], [False, False], [True, True]]
IDS = torch.randint(1, 300, (2, 24), generator=torch.Generator().manual_seed(0))


def allocation(pattern, granularity):
    return Allocation.from_full_mask(torch.tensor(pattern), model="tiny", granularity=granularity, window=WINDOW)


ALLOCATIONS = {"layer": allocation(LAYER, "layer"), "kv_head": allocation(KV_HEAD, "kv_head")}



@pytest.fixture(scope="module")
def root(tmp_path_factory, one_thread):
    """Each family saved (weights + tokenizer) and exported at both granularities (root/TYPE/layer, .../kv_head),
    then loaded by stock transformers in one fresh interpreter that has not imported consa: the stock exports
    plainly; the consa-format ones plainly (refused) and, after that, with trust_remote_code=True."""
    root = tmp_path_factory.mktemp("families")
    formats = {}
    for name, (model_type, extra, written_as) in FAMILIES.items():
        src = tiny.save_tiny(root / model_type / "src", model_type, **extra)
        for granularity in ALLOCATIONS:
            falls_back = granularity == "layer" and not written_as
            with pytest.warns(UserWarning, match="no per-layer attention types") if falls_back else nullcontext():
                summary = export_hybrid(str(src), ALLOCATIONS[granularity], root / model_type / granularity)
            formats[f"{model_type}/{granularity}"] = summary["format"]
            assert summary["format"] == ("layer_types" if granularity == "layer" and written_as else "consa")
    (root / "formats.json").write_text(json.dumps(formats))
    torch.save(IDS, root / "ids.pt")
    script = (
        "import json, sys, torch\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"root = {str(root)!r}\nids = torch.load(root + '/ids.pt')\nout, refused = {{}}, {{}}\n"
        "formats = json.load(open(root + '/formats.json'))\n"
        "def run(m):\n    with torch.no_grad():\n"
        "        return m.config.model_type, type(m).__module__, m(input_ids=ids).logits\n"
        "for d, fmt in formats.items():\n"
        "    if fmt == 'layer_types':\n"
        "        # Gemma 2 eager: transformers 5.17 would run it on SDPA and drop its soft cap (5.25 picks eager)\n"
        "        kw = {'attn_implementation': 'eager'} if d.startswith('gemma2/') else {}\n"
        "        out[d] = run(AutoModelForCausalLM.from_pretrained(f'{root}/{d}', **kw))\n"
        "        AutoTokenizer.from_pretrained(f'{root}/{d}')\n"
        "    else:\n        try:\n            AutoModelForCausalLM.from_pretrained(f'{root}/{d}')\n"
        "            refused[d] = ''\n"
        "        except ValueError as e:\n            refused[d] = str(e)\n"
        "assert 'consa' not in sys.modules\n"
        "for d in refused:\n"
        "    out[d] = run(AutoModelForCausalLM.from_pretrained(f'{root}/{d}', trust_remote_code=True))\n"
        "torch.save(out, root + '/stock.pt')\nopen(root + '/refused.json', 'w').write(json.dumps(refused))\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=root, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, env={**os.environ, "HF_MODULES_CACHE": str(root / "modules"), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def hybrid(name, granularity=None):
    """The family's tiny model (the weights saved in `root`), with an allocation installed if one is named."""
    model_type, extra, _ = FAMILIES[name]
    model = tiny.build_model(model_type, **extra)
    if granularity:
        apply_allocation(model, ALLOCATIONS[granularity])
    return model


@pytest.mark.parametrize("name", FAMILIES)
def test_full_attention_through_consa_is_the_stock_model(root, name):
    model_type = FAMILIES[name][0]
    model, _ = load_model(str(root / model_type / "src"))  # as `consa search` and `consa eval` load it
    with torch.no_grad():
        stock = model(IDS).logits
        install(model, window=WINDOW)
        assert torch.equal(model(IDS).logits, stock)
        if model_type == "gemma2":  # the soft cap really acts: without it the logits differ
            model.config.attn_logit_softcapping = None
            for layer in model.model.layers:
                layer.self_attn.attn_logit_softcapping = None
            assert (model(IDS).logits - stock).abs().max() > 1e-3


@pytest.mark.parametrize("name", FAMILIES)
def test_search(root, text_dir, name):
    model_type = FAMILIES[name][0]
    config = SearchConfig(model=str(root / model_type / "src"), dataset=str(text_dir), window=WINDOW, seq_len=32,
                          steps=3, batch_size=2, sparsity=0.5, granularity="kv_head")
    result = run_search(config)
    assert result.allocation.sparsity_achieved == 0.5
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history)


@pytest.fixture(scope="module")
def eval_set(text_dir, tokenizer):
    return build_eval_set(tokenizer, text_dir, seq_len=160, num_sequences=2, retrieval_docs=2, seed=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_evaluate(eval_set, tokenizer, name):
    model = hybrid(name)
    full = evaluate(model, tokenizer, None, data=eval_set, window=WINDOW)
    hyb = evaluate(model, tokenizer, ALLOCATIONS["kv_head"], data=eval_set)
    assert full["retrieval_acc"] is not None and hyb["kv_bytes_ratio"] < 1
    assert hyb["loss"] != full["loss"]
    scores = far_attention_scores(model, eval_set.rows, WINDOW)  # the retrieval-heads baseline
    assert scores.shape == (4, 2) and torch.isfinite(scores).all() and scores.sum() > 0


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("name", FAMILIES)
def test_export_stock(root, name):
    """A layer allocation: a stock config (`layer_types`), which transformers runs with no consa; a family
    whose config has no per-layer types gets the consa format instead, never a full-attention config."""
    model_type, _, written_as = FAMILIES[name]
    got_type, module, got = torch.load(root / "stock.pt")[f"{model_type}/layer"]
    want = _logits(hybrid(name, "layer"))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert (want - _logits(hybrid(name))).abs().max() > 1e-3  # the hybrid is not full attention
    config = json.loads((root / model_type / "layer" / "config.json").read_text())
    if written_as is None:
        assert got_type == "consa_hybrid" and config["consa"]["format"] == "consa"
        return
    assert got_type == written_as and module.startswith("transformers.models.")
    assert config["layer_types"] == ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]


@pytest.mark.parametrize("name", FAMILIES)
def test_export_consa(root, name):
    """A kv_head allocation: the consa format, refused by a plain stock load, the hybrid with remote code."""
    model_type = FAMILIES[name][0]
    got_type, module, got = torch.load(root / "stock.pt")[f"{model_type}/kv_head"]
    assert got_type == "consa_hybrid" and "modeling_consa_hybrid" in module  # the shipped file ran
    assert "trust_remote_code=True" in json.loads((root / "refused.json").read_text())[f"{model_type}/kv_head"]
    want = _logits(hybrid(name, "kv_head"))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert (want - _logits(hybrid(name))).abs().max() > 1e-3


@pytest.mark.parametrize("name", FAMILIES)
def test_load_hybrid(root, name):
    model_type = FAMILIES[name][0]
    for granularity in ALLOCATIONS:
        got = _logits(consa.load_hybrid(root / model_type / granularity))
        torch.testing.assert_close(got, _logits(hybrid(name, granularity)), atol=1e-5, rtol=1e-4)


def _greedy_recompute(model, prompt, steps):
    """Reference tokens: the whole sequence through the model every step, no cache."""
    ids = prompt
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(input_ids=ids, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    return ids


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(root, name, monkeypatch):
    """load_hybrid's generate (the hybrid KV cache for the consa format, transformers' own cache for layer
    exports) past the window gives the tokens of recomputing the whole sequence every step."""
    # The cache's PyTorch kernels: the fused Triton step (tests/test_decode_kernel.py) would run in Triton's
    # CPU interpreter here, seconds per token.
    monkeypatch.setenv("CONSA_DECODE_KERNEL", "0")
    model_type = FAMILIES[name][0]
    prompt = torch.randint(1, 300, (1, 11), generator=torch.Generator().manual_seed(1))
    formats = json.loads((root / "formats.json").read_text())
    for granularity in ALLOCATIONS:
        fmt = formats[f"{model_type}/{granularity}"]
        model = consa.load_hybrid(root / model_type / granularity)
        want = _greedy_recompute(model, prompt, 10)
        caches = []
        hook = model.register_forward_pre_hook(
            lambda m, a, kw: caches.append(kw["cache"] if kw.get("cache") is not None else kw.get("past_key_values")),
            with_kwargs=True)
        with torch.no_grad():
            got = model.generate(prompt, max_new_tokens=10, min_new_tokens=10, do_sample=False)
        hook.remove()
        assert torch.equal(got, want), fmt
        assert isinstance(caches[0], HybridCache) == (fmt == "consa")


def test_gemma3_layer_exports_with_their_own_rope_are_written_in_the_consa_format(tmp_path):
    """Footnote: Gemma 3 gives sliding layers another RoPE base; a full layer switched to sliding would move
    to it, so such an export is the consa format, which keeps each layer's RoPE."""
    extra = {**GEMMA}  # tiny_config's Gemma 3 defaults: RoPE base 10k for sliding layers, 1M for full ones
    model = tiny.build_model("gemma3_text", **extra)
    with pytest.warns(UserWarning, match="RoPE"):
        summary = export_hybrid(model, ALLOCATIONS["layer"], tmp_path / "g3")
    assert summary["format"] == "consa"
    apply_allocation(model, ALLOCATIONS["layer"])
    want = _logits(model)
    torch.testing.assert_close(_logits(consa.load_hybrid(tmp_path / "g3")), want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("model_type", ["bloom", "stablelm"])
def test_decoders_outside_the_attention_registry_are_refused(model_type):
    with pytest.raises(UnsupportedModelError, match="registry"):
        install(tiny.build_model(model_type), window=WINDOW)


def test_the_readme_table_claims_only_what_is_tested():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    table = readme.split("<!-- families -->")[1]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table.splitlines()
            if line.startswith("|")]
    header, body = rows[0], rows[2:]
    assert tuple(c.strip("`") for c in header[1:]) == COLUMNS
    for row in body:
        family, cells = row[0], row[1:]
        yes = [c for c in cells if c.lower().startswith("yes")]
        if yes:
            assert family in FAMILIES, f"{family}: a 'yes' with no test in {__name__}"
        for cell in cells:
            assert cell.lower().startswith(("yes", "no", "untested")), cell
            notes = re.findall(r"\[(\d+)\]", cell)
            if not cell.lower().startswith("yes"):
                assert notes, f"{family}: {cell!r} without a footnote saying why"
            for note in notes:
                assert re.search(rf"^- \[{note}\] \S", table, re.M), f"footnote [{note}] is not written"
    assert {row[0] for row in body} >= set(FAMILIES)
