"""Hybrid checkpoints: an allocation baked into an HF model directory, plus the DuoAttention TSV.

Two directory formats, both with the allocation in `config.json` under `consa` (the manifest):
- "layer_types" (layer granularity, model types that read `config.layer_types`: Qwen2, Qwen3):
  `layer_types` + `sliding_window` make stock transformers run the hybrid with no consa import.
- "consa" (KV-head granularity, sink tokens, or model types without per-layer types such as Llama):
  stock transformers would load the weights but run full attention everywhere; `load_hybrid(path)`
  installs consa's hybrid attention with hard gates.
`load_hybrid` reads both.
"""

import json
import shutil
import tarfile
import time
import warnings
from pathlib import Path

import torch

from consa.errors import ConsaError, UnsupportedModelError
from consa.hybrid_attention import apply_allocation, model_shape, uninstall
from consa.manifest import FULL, Allocation

# Model types whose attention reads `config.layer_types` + `config.sliding_window` per layer.
NATIVE_LAYER_TYPES = {"qwen2": {"use_sliding_window": True}, "qwen3": {"use_sliding_window": True}}
LAYER_FORMATS = ("auto", "layer_types", "consa")
DUO_TSV = "full_attention_heads.tsv"


# -- DuoAttention TSV ---------------------------------------------------------------------------------
def write_duo_tsv(allocation: Allocation, path) -> Path:
    """Rows = layers, columns = KV heads, 1 = full attention, tab-separated (DuoAttention's layout)."""
    path = Path(path)
    if path.is_dir():
        path = path / DUO_TSV
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = ["\t".join("1" if v == FULL else "0" for v in row) for row in allocation.assignment]
    path.write_text("\n".join(rows) + "\n")
    return path


def read_duo_tsv(path, *, model: str = "unknown", window: int, sink_tokens: int = 0, granularity: str = "kv_head",
                 sparsity: float | None = None, threshold: float = 0.5) -> Allocation:
    """Read a DuoAttention `full_attention_heads.tsv` (0/1 or learned gate values in [0, 1]).

    With `sparsity`, exactly round(s * N) heads with the lowest values become SWA (how DuoAttention
    binarises its gates); otherwise values >= `threshold` are full. DuoAttention's own files carry no
    window, so it is an argument (DuoAttention's "recent" size; its sink size is `sink_tokens`).
    """
    from consa.gates import exact_swa_mask

    path = Path(path)
    if path.is_dir():
        path = path / DUO_TSV
    try:
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        values = torch.tensor([[float(x) for x in ln.replace(",", "\t").split()] for ln in lines])
    except FileNotFoundError:
        raise ConsaError(f"DuoAttention TSV not found: {path}") from None
    except (ValueError, RuntimeError) as e:  # not numbers, or ragged rows
        raise ConsaError(f"{path} is not a layers x heads table of numbers: {e}") from None
    full = ~exact_swa_mask(values, sparsity) if sparsity is not None else values >= threshold
    if granularity == "layer" and any(len(set(row)) > 1 for row in full.tolist()):
        raise ConsaError(f"{path} switches single heads; read it with granularity='kv_head'")
    return Allocation.from_full_mask(full, model=model, granularity=granularity, window=window,
                                     sink_tokens=sink_tokens, method="duo-tsv",
                                     sparsity_target=float(1 - full.float().mean()))


# -- optional fine-tune with the allocation fixed -----------------------------------------------------
def finetune(model, allocation: Allocation, data: torch.Tensor, steps: int, *, lr: float = 1e-5,
             batch_size: int = 1, seed: int = 0, progress=None) -> list[dict]:
    """A short AdamW run on the weights with hard gates in place, next-token loss on `data` (N, T)."""
    apply_allocation(model, allocation)
    device = next(model.parameters()).device
    data = data.to(device)
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    history = []
    for step in range(steps):
        batch = data[torch.randint(0, data.shape[0], (batch_size,), generator=generator)]  # (B, T)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # a few steps on little data: keep them from jumping
        optimizer.step()
        record = {"step": step + 1, "total_steps": steps, "loss": round(loss.item(), 6)}
        history.append(record)
        if progress is not None:
            progress(record)
    model.eval()
    for p in params:
        p.requires_grad_(False)
    return history


# -- export -------------------------------------------------------------------------------------------
def _native_layer_config(model_type: str, allocation: Allocation) -> dict | None:
    """Config keys that make stock transformers run this allocation, or None when it cannot."""
    if allocation.granularity != "layer" or allocation.sink_tokens or model_type not in NATIVE_LAYER_TYPES:
        return None
    layer_types = ["full_attention" if full else "sliding_attention" for full in allocation.full_layers()]
    return {"layer_types": layer_types, "sliding_window": allocation.window,
            "max_window_layers": allocation.num_layers, **NATIVE_LAYER_TYPES[model_type]}


def export_hybrid(model_or_path, allocation: Allocation, out_dir, *, tokenizer=None, finetune_steps: int = 0,
                  data=None, seq_len: int = 512, lr: float = 1e-5, batch_size: int = 1, seed: int = 0,
                  layer_format: str = "auto", device: str = "cpu", progress=None) -> dict:
    """Write a hybrid checkpoint directory; returns a summary {out_dir, format, message, ...}.

    model_or_path: a loaded causal LM or a local path / hub id. data: a (N, T) token tensor or a text
    path (only for `finetune_steps` > 0). layer_format: "auto" (stock `layer_types` when the model type
    supports it, else the consa format with a warning), "layer_types" (error if impossible) or "consa".
    """
    from consa.loading import load_model

    if layer_format not in LAYER_FORMATS:
        raise ValueError(f"unknown layer_format {layer_format!r}: expected one of {', '.join(LAYER_FORMATS)}")
    if finetune_steps < 0:
        raise ValueError(f"finetune_steps must be >= 0, got {finetune_steps}")
    if isinstance(model_or_path, (str, Path)):
        model, loaded_tokenizer = load_model(str(model_or_path), allocation.revision, device)
        tokenizer = tokenizer or loaded_tokenizer
    else:
        model = model_or_path
    num_layers, num_kv_heads = model_shape(model)
    if (allocation.num_layers, allocation.num_kv_heads) != (num_layers, num_kv_heads):
        raise ConsaError(f"allocation is for {allocation.num_layers} layers x {allocation.num_kv_heads} KV heads, "
                         f"the model has {num_layers} x {num_kv_heads}")

    history = []
    if finetune_steps:
        if data is None:
            raise ConsaError("finetune_steps > 0 needs data (a token tensor or a text path)")
        if not isinstance(data, torch.Tensor):
            from consa.data import build_dataset

            if tokenizer is None:
                raise ConsaError("fine-tuning on a text path needs the tokenizer")
            data = build_dataset(tokenizer, data, seq_len, max(finetune_steps * batch_size, 1), seed=seed)
        history = finetune(model, allocation, data, finetune_steps, lr=lr, batch_size=batch_size, seed=seed,
                           progress=progress)

    model_type = model.config.model_type
    native = None if layer_format == "consa" else _native_layer_config(model_type, allocation)
    message = ""
    if native is None and allocation.granularity == "layer" and layer_format != "consa":
        why = (f"model type {model_type!r} has no per-layer attention types in its config" if not allocation.sink_tokens
               else "sink tokens are not expressible in layer_types")
        if layer_format == "layer_types":
            raise UnsupportedModelError(f"cannot export a stock layer_types checkpoint: {why} "
                                        f"(supported: {', '.join(sorted(NATIVE_LAYER_TYPES))}); use layer_format='consa'")
        message = (f"{why}: wrote the consa format instead; load it with consa.load_hybrid (stock transformers "
                   "would run full attention on every layer)")
        warnings.warn(message, stacklevel=2)
    fmt = "layer_types" if native else "consa"

    # Save with the model's ordinary attention so the config carries nothing consa-specific but `consa`.
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hybrid = getattr(model, "consa_hybrid", None)
    if hybrid is not None:
        uninstall(model)
    model.save_pretrained(out_dir, safe_serialization=True)
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    config.update(native or {})
    config["consa"] = {"format": fmt, "allocation": allocation.to_dict(),
                       "finetune": {"steps": finetune_steps, "lr": lr, "seed": seed, "history": history[-5:]}}
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    allocation.save(out_dir / "manifest.json")
    write_duo_tsv(allocation, out_dir / DUO_TSV)
    if tokenizer is None and isinstance(model_or_path, (str, Path)):
        tokenizer = _try_tokenizer(model_or_path)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    if hybrid is not None:  # leave the caller's model as it was
        apply_allocation(model, allocation)
    return {"out_dir": str(out_dir), "format": fmt, "granularity": allocation.granularity,
            "model_type": model_type, "finetune_steps": finetune_steps, "tokenizer": tokenizer is not None,
            "message": message or (f"stock transformers runs this checkpoint natively (layer_types on {model_type})"
                                   if native else "load with consa.load_hybrid(path)")}


def _try_tokenizer(path):
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, KeyError):
        return None


def load_hybrid(path, *, device="cpu", dtype=None, backend: str = "auto", hybrid_cache: bool = True):
    """Load a directory written by `export_hybrid` (either format) as a ready-to-run model.

    consa-format directories get the hybrid attention with hard gates; `layer_types` directories run
    on stock attention. With `hybrid_cache`, `model.generate` uses the memory-saving cache by default.
    """
    from transformers import AutoModelForCausalLM

    from consa import runtime

    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise ConsaError(f"not a model directory (no config.json): {path}") from None
    section = config.get("consa")
    if section is None:
        raise ConsaError(f"{path} is not a consa hybrid checkpoint (its config.json has no 'consa' section)")
    allocation = Allocation.from_dict(section["allocation"])
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto", attn_implementation="sdpa").to(device).eval()
    if section["format"] == "consa":
        apply_allocation(model, allocation, backend)
    model.consa_allocation = allocation
    if hybrid_cache:
        runtime.use_hybrid_cache(model)
    return model


def pack_checkpoint(directory, out_path=None) -> Path:
    """Pack a checkpoint directory into `<dir>.tar.gz` (members under the directory's name)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConsaError(f"not a directory: {directory}")
    out_path = Path(out_path) if out_path else directory.with_name(directory.name + ".tar.gz")
    tmp = out_path.with_name(out_path.name + f".{int(time.time() * 1000)}.tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(directory, arcname=directory.name)
    shutil.move(tmp, out_path)
    return out_path


__all__ = ["export_hybrid", "load_hybrid", "write_duo_tsv", "read_duo_tsv", "finetune", "pack_checkpoint",
           "NATIVE_LAYER_TYPES"]
