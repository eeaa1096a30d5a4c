"""Loading a causal LM and its tokenizer.

Loader failures (missing path, unknown hub id, a config transformers cannot read) become a
`ModelLoadError` with one readable line, so the CLI and the service can show them to the user.
"""

import json
from pathlib import Path

import torch

from consa.core.errors import ModelLoadError

LOAD_ERRORS = (OSError, ValueError, KeyError)  # what transformers raises for a path, hub id or config it cannot use


def load_error(model: str, e: Exception) -> ModelLoadError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return ModelLoadError(f"cannot load model {model!r}: {first}")


def is_export(model: str) -> bool:
    """Whether `model` is a `consa export` directory: its config.json has a `consa` section. False for
    anything else, an unreadable config included (transformers then says what is wrong with it)."""
    try:
        return "consa" in json.loads((Path(model) / "config.json").read_text())
    except (OSError, ValueError, TypeError, AttributeError):
        return False


def refuse_export(model: str) -> None:
    """ModelLoadError for a `consa export` directory. Its sliding layers live in its config, where consa's
    gates do not reach: "full attention" on it would not be full, and a search or comparison on it would
    measure against a hybrid. consa.load_hybrid (and `consa eval --model DIR`) read exports; a search
    starts from the model the export came from."""
    if is_export(model):
        raise ModelLoadError(f"{Path(model).name!r} is a consa export (an allocation is already applied in it): "
                             "search and compare the model it was exported from; score the export itself with "
                             "`consa eval --model` or load it with consa.load_hybrid")


def load_model(model: str, revision: str | None = None, device="cpu", dtype=torch.float32):
    """Load a causal LM (eval mode, on `device`) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    refuse_export(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model, revision=revision)
        try:
            lm = AutoModelForCausalLM.from_pretrained(model, revision=revision, dtype=dtype, attn_implementation="sdpa")
        except ValueError as e:
            if "attn_implementation" not in str(e) and "does not support" not in str(e):
                raise
            # Older architectures have no SDPA path; load them as they are and let install() say why.
            lm = AutoModelForCausalLM.from_pretrained(model, revision=revision, dtype=dtype)
    except LOAD_ERRORS as e:
        raise load_error(model, e) from None
    if soft_capped(lm.config) and lm.config._attn_implementation != "eager":
        lm.set_attn_implementation("eager")  # SDPA would drop the soft cap (transformers 5.17 lets it)
    tokenizer.model_max_length = int(1e12)  # documents are packed into seq_len rows, never fed whole
    return lm.to(device).eval(), tokenizer


def soft_capped(config) -> bool:
    """Whether a model soft-caps its attention logits (Gemma 2), which SDPA cannot do."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "attn_logit_softcapping", None) is not None


def stock_attention(config) -> str:
    """The stock attention to build a family with: SDPA, or eager where SDPA cannot run it: attention logit
    soft-capping (Gemma 2; transformers 5.25 has no SDPA path for it, 5.17 runs SDPA and drops the cap) or a
    family without SDPA. consa's hybrid attention replaces either once installed."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if soft_capped(config):
        return "eager"
    try:
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        return "sdpa"
    return "sdpa" if getattr(model_class, "_supports_sdpa", True) else "eager"


def weight_dtype(config, device="cpu") -> torch.dtype:
    """The dtype a search holds the frozen weights in (see SearchConfig.dtype): frozen weights need no
    fp32 master copy, so "auto" halves their memory on a GPU; CPUs get fp32 (bf16 matmuls are slow there)."""
    if config.dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return torch.bfloat16 if config.dtype == "bfloat16" else torch.float32


def free_accelerator_memory() -> None:
    """Give a released model's GPU memory back to the device (the next model or job on it needs it)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
