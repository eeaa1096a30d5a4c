"""The allocation: which attention units keep full attention, as a manifest people can read.

`assignment[layer][kv_head]` is "full" or "swa". For layer granularity each row is uniform.
The same object carries learned allocations and every baseline, so they compare like for like.
"""

import datetime as _dt
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from consa.core.units import UnitGrid, unit_grid
from consa.core.version import __version__

FORMAT = "consa.allocation/v1"
FULL, SWA = "full", "swa"


@dataclass
class Allocation:
    model: str
    granularity: str
    num_layers: int
    num_kv_heads: int
    window: int
    assignment: list  # [num_layers][num_kv_heads] of "full" / "swa"
    sink_tokens: int = 0
    sparsity_target: float | None = None
    gate_prob_full: list | None = None  # [num_layers][num_kv_heads], learned allocations only
    method: str = "learned"
    revision: str | None = None
    training: dict = field(default_factory=dict)
    evaluation: dict = field(default_factory=dict)
    created_at: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat())
    consa_version: str = ""

    def __post_init__(self):
        grid = unit_grid(self.granularity, self.num_layers, self.num_kv_heads)  # also checks the name
        if self.window <= 0:
            raise ValueError(f"window must be a positive number of tokens, got {self.window}")
        if self.sink_tokens < 0:
            raise ValueError(f"sink_tokens must be >= 0, got {self.sink_tokens}")
        if len(self.assignment) != self.num_layers or any(len(r) != self.num_kv_heads for r in self.assignment):
            raise ValueError(f"assignment must be {self.num_layers} rows of {self.num_kv_heads} entries")
        bad = {v for row in self.assignment for v in row} - {FULL, SWA}
        if bad:
            raise ValueError(f"assignment entries must be 'full' or 'swa', got {sorted(bad)}")
        if not grid.expressible(self.full_mask()):
            raise ValueError(f"a {self.granularity}-granularity assignment must switch whole units")
        self.consa_version = self.consa_version or __version__

    # -- views -------------------------------------------------------------------------------
    @property
    def grid(self) -> UnitGrid:
        return unit_grid(self.granularity, self.num_layers, self.num_kv_heads)

    @property
    def num_units(self) -> int:
        return self.grid.count

    @property
    def sparsity_achieved(self) -> float:
        swa = sum(v == SWA for row in self.assignment for v in row)
        return swa / (self.num_layers * self.num_kv_heads)

    def full_mask(self) -> torch.Tensor:
        """(num_layers, num_kv_heads) bool, True = full attention."""
        return torch.tensor([[v == FULL for v in row] for row in self.assignment], dtype=torch.bool)

    def switches_whole_layers(self) -> bool:
        """Every layer is all full or all SWA: a per-layer config (layer_types) can express it."""
        return all(len(set(row)) == 1 for row in self.assignment)

    def full_layers(self) -> list[bool]:
        return [all(v == FULL for v in row) for row in self.assignment]

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_full_mask(cls, full: torch.Tensor, **fields) -> "Allocation":
        """Build from a (num_layers, num_kv_heads) bool tensor, True = full."""
        rows = [[FULL if bool(x) else SWA for x in row] for row in full.tolist()]
        return cls(num_layers=full.shape[0], num_kv_heads=full.shape[1], assignment=rows, **fields)

    # -- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d = {"format": FORMAT, **d, "sparsity_achieved": self.sparsity_achieved}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Allocation":
        if d.get("format") != FORMAT:
            raise ValueError(f"not a consa allocation manifest (format {d.get('format')!r}, expected {FORMAT!r})")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        tmp.replace(path)
        return path


def load_allocation(path) -> Allocation:
    path = Path(path)
    if path.is_dir():
        path = path / "manifest.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"allocation manifest not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"allocation manifest {path} is not valid JSON: {e}") from None
    return Allocation.from_dict(data)
