"""Layer exports for every family whose stock config reads `layer_types`: stock transformers, with no
consa import, gives the hybrid's logits; families where a stock config cannot say it are refused."""

import json
import subprocess
import sys

import pytest
import tiny
import torch
from transformers import AutoModelForCausalLM

from consa.core.errors import UnsupportedModelError
from consa.export.checkpoint import export_hybrid, layer_types_config
from consa.model.hybrid_attention import apply_allocation
from consa.core.manifest import Allocation

WINDOW = 6
LAYER = [[True, True], [False, False], [True, True], [False, False]]
IDS = torch.randint(1, 300, (2, 24), generator=torch.Generator().manual_seed(0))
GEMMA = dict(attn_logit_softcapping=None, final_logit_softcapping=None, query_pre_attn_scalar=8,
             layer_types=["full_attention"] * 4)
SAME_ROPE = {"full_attention": {"rope_type": "default", "rope_theta": 10000.0},
             "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
# family -> (tiny config extras, the model type the checkpoint is written as)
FAMILIES = {
    "qwen3": ({}, "qwen3"),
    "qwen2": ({}, "qwen2"),
    "llama": ({}, "ministral"),
    "mistral": ({}, "ministral"),
    "ministral": ({"layer_types": ["full_attention"] * 4}, "ministral"),
    "gemma2": (GEMMA, "gemma2"),
    "gemma3_text": ({**GEMMA, "rope_parameters": SAME_ROPE}, "gemma3_text"),
}


# Gemma 2 has no SDPA path in transformers (its logit soft-capping); it runs eager, in both places.
EAGER = {"gemma2"}


def build(family, **extra):
    torch.manual_seed(0)
    attn = "eager" if family in EAGER else "sdpa"
    return AutoModelForCausalLM.from_config(tiny.tiny_config(family, **extra), attn_implementation=attn).eval()


def layer_allocation(pattern=LAYER, window=WINDOW):
    return Allocation.from_full_mask(torch.tensor(pattern), model="tiny", granularity="layer", window=window)


@pytest.fixture(scope="module")
def stock_logits(tmp_path_factory):
    """Every family exported, then run in ONE fresh interpreter that never imports consa."""
    root = tmp_path_factory.mktemp("families")
    for family, (extra, _) in FAMILIES.items():
        summary = export_hybrid(build(family, **extra), layer_allocation(), root / family)
        assert summary["format"] == "layer_types", summary
    torch.save(IDS, root / "ids.pt")
    script = (
        "import sys, torch\nfrom transformers import AutoModelForCausalLM\n"
        f"ids = torch.load({str(root / 'ids.pt')!r})\nout = {{}}\n"
        f"for family in {list(FAMILIES)!r}:\n"
        f"    attn = 'eager' if family in {sorted(EAGER)!r} else 'sdpa'\n"
        f"    m = AutoModelForCausalLM.from_pretrained({str(root)!r} + '/' + family, attn_implementation=attn)\n"
        "    with torch.no_grad():\n        out[family] = (m.config.model_type, m(input_ids=ids).logits)\n"
        "assert 'consa' not in sys.modules\n"
        f"torch.save(out, {str(root / 'logits.pt')!r})\n")
    subprocess.run([sys.executable, "-c", script], check=True, cwd=root, stdin=subprocess.DEVNULL)
    return root, torch.load(root / "logits.pt")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_stock_transformers_runs_the_layer_hybrid(stock_logits, family):
    root, logits = stock_logits
    extra, written_as = FAMILIES[family]
    model_type, got = logits[family]
    assert model_type == written_as
    hybrid = build(family, **extra)
    apply_allocation(hybrid, layer_allocation())
    with torch.no_grad():
        want = hybrid(input_ids=IDS).logits
        full = build(family, **extra)(input_ids=IDS).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert (full - want).abs().max() > 1e-3  # the sliding layers really change the output
    config = json.loads((root / family / "config.json").read_text())
    assert config["layer_types"] == ["full_attention", "sliding_attention"] * 2 and config["sliding_window"] == WINDOW


@pytest.mark.parametrize("family,extra,why", [
    ("gemma3_text", GEMMA, "RoPE"),  # Gemma 3's own RoPE bases differ per layer type
    ("mistral", {"sliding_window": 64}, "window 64"),  # a Mistral that already slides everywhere
    ("gemma2", {**GEMMA, "layer_types": None, "sliding_window": 64}, "window 64"),
    ("llama", {"attention_bias": True}, "biases"),
    ("gpt_neox", {"rotary_pct": 1.0}, "'gpt_neox'"),
])
def test_families_a_stock_config_cannot_express_are_refused(tmp_path, family, extra, why):
    config = tiny.tiny_config(family, **extra)
    changes, reason = layer_types_config(config, layer_allocation())
    assert changes is None and why in reason


def test_strict_layer_types_export_names_the_reason(tmp_path):
    with pytest.raises(UnsupportedModelError, match="biases"):
        export_hybrid(build("llama", attention_bias=True), layer_allocation(), tmp_path / "x",
                      layer_format="layer_types")


def test_native_sliding_layers_stay_sliding_when_the_window_matches():
    config = tiny.tiny_config("gemma2", **{**GEMMA, "layer_types": None, "sliding_window": WINDOW})
    changes, _ = layer_types_config(config, layer_allocation([[True, True]] * 3 + [[False, False]]))
    # Gemma 2's own pattern (sliding, full, sliding, full) plus the allocation's last layer
    assert changes["set"]["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention",
                                             "sliding_attention"]
