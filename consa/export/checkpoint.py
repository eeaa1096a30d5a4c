"""Hybrid checkpoints: an allocation baked into an HF model directory.

Two directory formats, both with the allocation in `config.json` under `consa` (the manifest):
- "layer_types" (layer granularity, families whose stock config reads per-layer `layer_types`, see
  LAYER_FAMILIES): `layer_types` + `sliding_window` make stock transformers run the hybrid with no
  consa import (Llama and Mistral are written as Ministral, the same weights with per-layer types).
- "consa" (KV-head granularity, sink tokens, or families with no per-layer types): model type
  "consa_hybrid" plus a modeling file beside the weights (consa/remote_modeling.py), so stock
  `from_pretrained` refuses to run it as full attention unless `trust_remote_code=True`, which
  installs consa's hybrid attention. `load_hybrid(path)` reads both formats. Importing this module
  registers "consa_hybrid" with transformers' Auto classes, so that in a process with consa the
  tokenizer and the model of a consa-format directory load with no remote code and no prompt.

Weights keep the source checkpoint's dtype (bf16 stays bf16) and are sharded as transformers shards.
"""

import functools
import json
import shutil
import tarfile
import time
import warnings
from pathlib import Path

import torch

from consa.export.duo_format import DUO_TSV, write_duo_tsv
from consa.core.errors import ConsaError, UnsupportedModelError
from consa.model.hybrid_attention import apply_allocation, model_shape, uninstall
from consa.model.loading import stock_attention
from consa.core.manifest import Allocation

LAYER_FORMATS = ("auto", "layer_types", "consa")
REMOTE_MODELING = "modeling_consa_hybrid.py"
HYBRID_MODEL_TYPE = "consa_hybrid"
# How each family's stock config expresses per-layer sliding windows (read from its transformers
# configuration and modeling code): the keys to set, and the family to write it as.
LAYER_FAMILIES = {
    "qwen2": {"as": "qwen2", "set": {"use_sliding_window": True}, "max_window_layers": True},
    "qwen3": {"as": "qwen3", "set": {"use_sliding_window": True}, "max_window_layers": True},
    "gemma2": {"as": "gemma2"},
    "gemma3_text": {"as": "gemma3_text"},
    "ministral": {"as": "ministral"},
    # Llama and Mistral read no layer_types; Ministral is the same decoder (same weight names) with them.
    "llama": {"as": "ministral", "drop": ("attention_bias", "mlp_bias", "pretraining_tp")},
    "mistral": {"as": "ministral"},
}
NATIVE_LAYER_TYPES = tuple(LAYER_FAMILIES)


# -- which checkpoint format an allocation can take ------------------------------------------------
def layer_types_config(config, allocation: Allocation) -> tuple[dict | None, str]:
    """(config.json changes that make stock transformers run this layer allocation, "") or (None, why not)."""
    model_type = config.model_type
    if not allocation.switches_whole_layers():
        return None, "the allocation switches single KV heads, which no stock config expresses"
    if allocation.sink_tokens:
        return None, "sink tokens are not expressible in layer_types"
    family = LAYER_FAMILIES.get(model_type)
    if family is None:
        return None, f"model type {model_type!r} has no per-layer attention types in its config"
    if model_type == "llama" and (getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)):
        return None, "this Llama has attention/MLP biases, which Ministral (Llama with layer_types) has not"
    # A family with its own sliding layers keeps them sliding; one window must then serve both.
    native = list(getattr(config, "layer_types", None) or [])
    native_sliding = [t == "sliding_attention" for t in native] if model_type not in ("llama", "mistral") else []
    if model_type == "mistral" and config.sliding_window is not None:
        native_sliding = [True] * allocation.num_layers
    if any(native_sliding) and config.sliding_window != allocation.window:
        return None, (f"the model already has sliding layers with window {config.sliding_window}; one config "
                      f"window cannot also hold the allocation's {allocation.window}")
    sliding = [not full or (bool(native_sliding) and native_sliding[i])
               for i, full in enumerate(allocation.full_layers())]
    if model_type == "gemma3_text":
        rope = config.rope_parameters or {}
        switched = any(s and not (native_sliding and native_sliding[i]) for i, s in enumerate(sliding))
        if switched and rope.get("sliding_attention") != rope.get("full_attention"):
            return None, ("Gemma 3 gives sliding layers another RoPE base than full ones, so a full layer "
                          "written as sliding would change its positions")
    changes = {"layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
               "sliding_window": allocation.window, **family.get("set", {})}
    if family.get("max_window_layers"):
        changes["max_window_layers"] = allocation.num_layers  # Qwen ignores it once layer_types is given
    if family["as"] != model_type:
        changes |= {"model_type": family["as"], "architectures": ["MinistralForCausalLM"]}
    return {"set": changes, "drop": family.get("drop", ())}, ""


def source_dtype(model: str, revision: str | None = None) -> torch.dtype | None:
    """The dtype of a source checkpoint, where its config is at hand (a local directory or the hub cache)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model, revision=revision, local_files_only=not Path(model).is_dir())
    except (OSError, ValueError, KeyError):
        return None
    dtype = getattr(config, "dtype", None)
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


# -- export -------------------------------------------------------------------------------------------
def export_hybrid(model_or_path, allocation: Allocation, out_dir, *, tokenizer=None, finetune_steps: int = 0,
                  data=None, seq_len: int = 512, lr: float = 1e-5, batch_size: int = 1, seed: int = 0,
                  layer_format: str = "auto", device: str = "cpu", dtype="auto", max_shard_size="5GB",
                  progress=None) -> dict:
    """Write a hybrid checkpoint directory; returns a summary {out_dir, format, message, ...}.

    model_or_path: a loaded causal LM or a local path / hub id. data: a (N, T) token tensor or a text
    path (only for `finetune_steps` > 0). layer_format: "auto" (stock `layer_types` when the family
    supports it, else the consa format with a warning), "layer_types" (error if impossible) or "consa".
    dtype: the weights' dtype on disk; "auto" = the source checkpoint's (a model searched in fp32 from
    a bf16 checkpoint is written in bf16 again).
    """
    from consa.export.finetune import finetune, finetune_data
    from consa.model.loading import load_model

    if layer_format not in LAYER_FORMATS:
        raise ValueError(f"unknown layer_format {layer_format!r}: expected one of {', '.join(LAYER_FORMATS)}")
    if finetune_steps < 0:
        raise ValueError(f"finetune_steps must be >= 0, got {finetune_steps}")
    if isinstance(model_or_path, (str, Path)):
        # The source's own dtype, except for fine-tuning: AdamW steps on bf16 weights mostly round away.
        model, loaded_tokenizer = load_model(str(model_or_path), allocation.revision, device,
                                             dtype=torch.float32 if finetune_steps else "auto")
        tokenizer = tokenizer or loaded_tokenizer
        save_dtype = source_dtype(str(model_or_path), allocation.revision)
    else:
        model = model_or_path
        save_dtype = source_dtype(allocation.model, allocation.revision)
    if dtype != "auto":
        save_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    num_layers, num_kv_heads = model_shape(model)
    if (allocation.num_layers, allocation.num_kv_heads) != (num_layers, num_kv_heads):
        raise ConsaError(f"allocation is for {allocation.num_layers} layers x {allocation.num_kv_heads} KV heads, "
                         f"the model has {num_layers} x {num_kv_heads}")

    history = []
    if finetune_steps:
        data = finetune_data(tokenizer, data, seq_len, finetune_steps, batch_size, seed)
        history = finetune(model, allocation, data, finetune_steps, lr=lr, batch_size=batch_size, seed=seed,
                           progress=progress)

    model_type = model.config.model_type
    native, why = (None, "asked for the consa format") if layer_format == "consa" else \
        layer_types_config(model.config, allocation)
    message = ""
    if native is None and allocation.switches_whole_layers() and layer_format != "consa":
        if layer_format == "layer_types":
            raise UnsupportedModelError(f"cannot export a stock layer_types checkpoint: {why} "
                                        f"(supported: {', '.join(NATIVE_LAYER_TYPES)}); use layer_format='consa'")
        message = (f"{why}: wrote the consa format instead; load it with consa.load_hybrid or "
                   "trust_remote_code=True (stock transformers refuses it without)")
        warnings.warn(message, stacklevel=2)
    fmt = "layer_types" if native else "consa"

    # Save with the model's ordinary attention so the config carries nothing consa-specific but `consa`.
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hybrid = getattr(model, "consa_hybrid", None)
    if hybrid is not None:
        uninstall(model)
    held_dtype = next(model.parameters()).dtype
    if save_dtype is not None and save_dtype != held_dtype:
        model.to(save_dtype)
    try:
        model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    finally:
        if save_dtype is not None and save_dtype != held_dtype:
            model.to(held_dtype)
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    section = {"format": fmt, "base_model_type": model_type, "allocation": allocation.to_dict(),
               "finetune": {"steps": finetune_steps, "lr": lr, "seed": seed, "history": history[-5:]}}
    if native:
        for key in native["drop"]:
            config.pop(key, None)
        config.update(native["set"])
    else:
        _write_remote_modeling(out_dir, model_type)
        config.update({"model_type": HYBRID_MODEL_TYPE, "architectures": ["ConsaHybridForCausalLM"],
                       "auto_map": {"AutoConfig": f"{REMOTE_MODELING[:-3]}.ConsaHybridConfig",
                                    "AutoModelForCausalLM": f"{REMOTE_MODELING[:-3]}.ConsaHybridForCausalLM"}})
    config["consa"] = section
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    allocation.save(out_dir / "manifest.json")
    write_duo_tsv(allocation, out_dir / DUO_TSV)
    if tokenizer is None and isinstance(model_or_path, (str, Path)):
        tokenizer = _try_tokenizer(model_or_path)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    if hybrid is not None:  # leave the caller's model as it was
        apply_allocation(model, allocation)
    written = native["set"].get("model_type", model_type) if native else HYBRID_MODEL_TYPE
    return {"out_dir": str(out_dir), "format": fmt, "granularity": allocation.granularity,
            "model_type": written, "source_model_type": model_type,
            "dtype": str(save_dtype or held_dtype).removeprefix("torch."), "finetune_steps": finetune_steps,
            "tokenizer": tokenizer is not None,
            "message": message or (f"stock transformers runs this checkpoint natively (layer_types on {written})"
                                   + (f"; {SERVING_CAVEATS[written]}" if written in SERVING_CAVEATS else "")
                                   if native else "load with consa.load_hybrid(path), or from_pretrained(path, "
                                                  "trust_remote_code=True) with consa installed")}


# Serving engines that load a stock layer export yet ignore its per-layer windows, silently: every
# layer then runs full attention (docs/EXPORT.md has the source lines, vLLM 0.34.0 / SGLang 0.5.23;
# read, not run). The export's summary says so, since nothing at serving time will.
SERVING_CAVEATS = dict.fromkeys(
    ("qwen2", "qwen3"), "vLLM's native Qwen2/3 and SGLang ignore layer_types (every layer full attention, "
                        "silently): serve it with `vllm serve DIR --model-impl transformers`")


def _write_remote_modeling(out_dir: Path, base_model_type: str) -> None:
    template = (Path(__file__).with_name("remote_modeling.py")).read_text()
    marker = 'BASE_MODEL_TYPE = ""'
    if marker not in template:  # the template and this writer must change together
        raise RuntimeError(f"consa/remote_modeling.py lost its `{marker}` line")
    (out_dir / REMOTE_MODELING).write_text(template.replace(marker, f"BASE_MODEL_TYPE = {base_model_type!r}", 1))


def _try_tokenizer(path):
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, KeyError):
        return None


# -- the Auto classes, in a process that imported consa --------------------------------------------------------
# Without consa, a consa-format directory is remote code: AutoConfig (and so AutoTokenizer, which always reads
# the config first) asks before running it, and AutoModelForCausalLM refuses it without trust_remote_code. With
# consa imported, model type "consa_hybrid" is registered here as local code, the way transformers registers
# custom architectures: AutoConfig and AutoTokenizer read such a directory with no prompt, and
# AutoModelForCausalLM builds the hybrid (consa's classes, the same as the shipped file's) with or without
# trust_remote_code. Neither path can give full attention: the registered model installs the allocation.
@functools.cache
def _registered_classes(base_model_type: str):
    from transformers import AutoModelForCausalLM

    from consa.export.remote_modeling import hybrid_classes

    config_class, model_class = hybrid_classes(base_model_type)
    AutoModelForCausalLM.register(config_class, model_class, exist_ok=True)
    return config_class, model_class


def _register_auto_classes() -> None:
    from transformers import AutoConfig, PreTrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if HYBRID_MODEL_TYPE in CONFIG_MAPPING:
        return

    class ConsaHybridAutoConfig(PreTrainedConfig):
        """Reads a consa-format config.json as its base family's hybrid config."""

        model_type = HYBRID_MODEL_TYPE

        @classmethod
        def from_dict(cls, config_dict, **kwargs):
            base = (config_dict.get("consa") or {}).get("base_model_type")
            if base not in CONFIG_MAPPING or base == HYBRID_MODEL_TYPE:
                raise ValueError(f"this consa checkpoint names base model type {base!r}, which this transformers "
                                 "version does not know")
            return _registered_classes(base)[0].from_dict(config_dict, **kwargs)

    AutoConfig.register(HYBRID_MODEL_TYPE, ConsaHybridAutoConfig)


_register_auto_classes()


def _base_config(path: Path, config: dict):
    """A consa-format config.json read as its base family's config (no remote code involved)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    base = config["consa"].get("base_model_type")
    if base not in CONFIG_MAPPING:
        raise ConsaError(f"{path}: its consa section names base model type {base!r}, which this transformers "
                         "version does not know")
    fields = {k: v for k, v in config.items() if k not in ("model_type", "auto_map", "architectures")}
    return CONFIG_MAPPING[base].from_dict(fields)


def load_hybrid(path, *, device="cpu", dtype=None, backend: str = "auto", hybrid_cache: bool = True):
    """Load a directory written by `export_hybrid` (either format) as a ready-to-run model.

    consa-format directories get the hybrid attention with hard gates; `layer_types` directories run
    on stock attention. With `hybrid_cache`, `model.generate` uses the memory-saving cache by default.
    """
    from transformers import AutoModelForCausalLM

    from consa.runtime import generation as runtime

    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise ConsaError(f"not a model directory (no config.json): {path}") from None
    section = config.get("consa")
    if section is None:
        raise ConsaError(f"{path} is not a consa hybrid checkpoint (its config.json has no 'consa' section)")
    allocation = Allocation.from_dict(section["allocation"])
    if config.get("model_type") == HYBRID_MODEL_TYPE:
        base = _base_config(path, config)
    else:
        from transformers import AutoConfig

        base = AutoConfig.from_pretrained(path)
    # SDPA, or eager for a family without it (Gemma 2), as stock transformers would run the layer format
    kwargs = {"dtype": dtype or "auto", "config": base, "attn_implementation": stock_attention(base)}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs).to(device).eval()
    if section["format"] == "consa":
        apply_allocation(model, allocation, backend)
    model.consa_allocation = allocation
    if hybrid_cache:
        runtime.use_hybrid_cache(model)
    return model


def pack_checkpoint(directory, out_path=None) -> Path:
    """Pack a checkpoint directory into an uncompressed `<dir>.tar` (members under the directory's name).

    Not gzip: safetensors weights barely compress, and gzip costs minutes of CPU on a large checkpoint.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ConsaError(f"not a directory: {directory}")
    out_path = Path(out_path) if out_path else directory.with_name(directory.name + ".tar")
    tmp = out_path.with_name(out_path.name + f".{int(time.time() * 1000)}.tmp")
    with tarfile.open(tmp, "w") as tar:
        tar.add(directory, arcname=directory.name)
    shutil.move(tmp, out_path)
    return out_path


__all__ = ["export_hybrid", "load_hybrid", "pack_checkpoint", "layer_types_config", "NATIVE_LAYER_TYPES",
           "LAYER_FAMILIES"]
