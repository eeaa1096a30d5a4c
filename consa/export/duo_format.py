"""DuoAttention's attention-pattern folder: `full_attention_heads.tsv` + `config.json`.

DuoAttention (mit-han-lab/duo-attention, `duo_attn.utils.load_attn_pattern(dir)`) reads a folder
holding the TSV (rows = layers, columns = KV heads, 1 = full "retrieval" head, values may be learned
gates in [0, 1]) and a `config.json` with `sink_size` and `recent_size`; streaming heads keep the
sink tokens plus the `recent_size` most recent ones. Our window is their `recent_size`, our sink
tokens their `sink_size`.
"""

import json
from pathlib import Path

import torch

from consa.core.errors import ConsaError
from consa.core.manifest import FULL, Allocation
from consa.core.units import unit_grid

DUO_TSV = "full_attention_heads.tsv"
DUO_CONFIG = "config.json"


def write_duo_tsv(allocation: Allocation, path) -> Path:
    """Only the TSV (the table a checkpoint directory carries beside its weights)."""
    path = Path(path)
    if path.is_dir():
        path = path / DUO_TSV
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = ["\t".join("1" if v == FULL else "0" for v in row) for row in allocation.assignment]
    path.write_text("\n".join(rows) + "\n")
    return path


def write_duo_pattern(allocation: Allocation, out_dir) -> Path:
    """A folder DuoAttention's `load_attn_pattern(out_dir)` reads; created when missing."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConsaError(f"{out_dir} is a file; DuoAttention reads a folder (TSV + config.json)")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_duo_tsv(allocation, out_dir / DUO_TSV)
    config = {"sink_size": allocation.sink_tokens, "recent_size": allocation.window,
              # not read by DuoAttention; kept so `consa import-duo` gives back the same allocation
              "consa": {"model": allocation.model, "granularity": allocation.granularity,
                        "sparsity": allocation.sparsity_achieved}}
    (out_dir / DUO_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def read_duo_tsv(path, *, model: str = "unknown", window: int | None = None, sink_tokens: int | None = None,
                 granularity: str = "kv_head", sparsity: float | None = None, threshold: float = 0.5) -> Allocation:
    """Read a DuoAttention pattern: a folder (TSV + config.json) or a bare TSV.

    With `sparsity`, exactly round(s * N) heads with the lowest values become SWA (how DuoAttention
    binarises its gates); otherwise values >= `threshold` are full. The window and sink size come from
    the folder's config.json (recent_size, sink_size) unless given; a bare TSV needs `window`.
    """
    from consa.core.units import exact_swa_mask

    path = Path(path)
    config = {}
    if path.is_dir():
        if (path / DUO_CONFIG).exists():
            config = json.loads((path / DUO_CONFIG).read_text())
        path = path / DUO_TSV
    window = window if window is not None else config.get("recent_size")
    sink_tokens = sink_tokens if sink_tokens is not None else config.get("sink_size", 0)
    if window is None:
        raise ConsaError(f"{path}: no window given and no config.json with recent_size beside it")
    try:
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        values = torch.tensor([[float(x) for x in ln.replace(",", "\t").split()] for ln in lines])
    except FileNotFoundError:
        raise ConsaError(f"DuoAttention TSV not found: {path}") from None
    except (ValueError, RuntimeError) as e:  # not numbers, or ragged rows
        raise ConsaError(f"{path} is not a layers x heads table of numbers: {e}") from None
    values = values.reshape(len(lines), -1).clamp(0, 1)  # np.loadtxt gives a 1-D row for one head
    full = ~exact_swa_mask(values, sparsity) if sparsity is not None else values >= threshold
    if not unit_grid(granularity, *full.shape).expressible(full):
        raise ConsaError(f"{path} switches single heads; read it with granularity='kv_head'")
    model = config.get("consa", {}).get("model", model) if model == "unknown" else model
    return Allocation.from_full_mask(full, model=model, granularity=granularity, window=int(window),
                                     sink_tokens=int(sink_tokens), method="duo-tsv",
                                     sparsity_target=float(1 - full.float().mean()))


__all__ = ["write_duo_tsv", "write_duo_pattern", "read_duo_tsv", "DUO_TSV"]
