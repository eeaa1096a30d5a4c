"""Rule-based and heuristic allocations: what a learned allocation has to beat.

Every builder returns an `Allocation` with exactly round(s * N) SWA units (N = layers for `layer`
granularity, layers * kv_heads for `kv_head`), so all methods compare at the same KV budget.

Each rule is a *priority order* over units: the first round(s * N) units of the order become SWA.
That one mechanism makes every rule hit the exact count:

- `interleave-k:1` (k local layers per global one; 1:1 Gemma 2, 3:1 Cohere2, 5:1 Gemma 3): layer i is
  local in the pattern when i % (k + 1) != k. If the budget is smaller than the pattern's local layers,
  the SWA layers are picked evenly spread over the pattern's local layers (so it stays interleaved,
  not "bottom"); if larger, the extra SWA layers are the pattern's global layers, again evenly spread.
- `bottom`: the lowest layers are SWA (layers 0, 1, ...).
- `top`: the highest layers are SWA, as Qwen2's `max_window_layers` (layers >= max_window_layers slide).
- `random`: a seeded permutation of the units.
- `even` (kv_head only): every layer gets the same number of SWA heads, round(s*L*K) // L; the
  remainder goes to layers evenly spread over depth; inside a layer the chosen heads rotate with
  the layer index so that every head index is used about equally often.
- `heuristic-loss`: training-free. Score each unit by the calibration loss increase when that unit
  alone becomes SWA; the units that hurt least become SWA.
- `retrieval-heads`: training-free. Score each KV head by the attention mass its queries put on keys
  beyond the window on calibration rows (consa.evaluation.attention_scores); a unit's score is the mean over its
  heads.
- `duo`: DuoAttention's method (consa.evaluation.duo): a real-valued gate per KV head trained to keep the final
  hidden states of the full model under an L1 pull towards streaming; the lowest gates become SWA,
  a unit's score being the mean over its heads.

Units come from the granularity's UnitGrid (consa.core.units), so nothing here branches on its name: the
layer rules order layers and fill the budget unit by unit along that order (a unit that covers part
of a layer, such as a KV head, goes lowest head index first); score-based baselines rank units.
"""

import random as _random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from consa.core.errors import Cancelled, DataError
from consa.core.units import exact_swa_mask
from consa.core.manifest import Allocation
from consa.core.units import UnitGrid, unit_grid


def num_swa_units(num_units: int, sparsity: float) -> int:
    if not 0.0 <= float(sparsity) <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    return int(round(sparsity * num_units))


def _spread(items: list, n: int) -> list:
    """n of the items, evenly spaced over the list (deterministic; all of them when n >= len)."""
    m = len(items)
    if n >= m:
        return list(items)
    return [items[(2 * j + 1) * m // (2 * n)] for j in range(n)]


# -- layer orders (first = SWA first) -------------------------------------------------------------
def _evenly_ordered(items: list) -> list:
    """Order such that every prefix is evenly spread over the items."""
    order: list = []
    for n in range(1, len(items) + 1):
        order += [x for x in _spread(items, n) if x not in order]
    return order


def interleave_order(num_layers: int, local_per_global: int) -> list[int]:
    k = local_per_global
    local = [i for i in range(num_layers) if i % (k + 1) != k]
    glob = [i for i in range(num_layers) if i % (k + 1) == k]
    # Prefixes shorter than the local set must stay evenly spread over it; so must the fill.
    return _evenly_ordered(local) + _evenly_ordered(glob)


def layer_order(rule: str, num_layers: int, seed: int = 0) -> list[int]:
    if rule == "bottom":
        return list(range(num_layers))
    if rule == "top":
        return list(range(num_layers - 1, -1, -1))
    if rule == "random":
        order = list(range(num_layers))
        _random.Random(seed).shuffle(order)
        return order
    if rule.startswith("interleave-"):
        local, glob = rule.removeprefix("interleave-").split(":")
        if int(glob) != 1:
            raise ValueError(f"interleave patterns are k:1 (local:global), got {rule!r}")
        return interleave_order(num_layers, int(local))
    raise ValueError(f"unknown layer rule {rule!r}")


# -- from an order or a score to an allocation ----------------------------------------------------
def _allocation(swa: torch.Tensor, *, method: str, granularity: str, sparsity: float, window: int,
                sink_tokens: int = 0, model_name: str = "", **extra) -> Allocation:
    """swa: (L, K) bool, True = SWA."""
    return Allocation.from_full_mask(~swa, model=model_name, granularity=granularity, window=window,
                                     sink_tokens=sink_tokens, sparsity_target=float(sparsity), method=method, **extra)


def _swa_units(grid: UnitGrid, unit_scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """(L, K) bool: the round(s * N) lowest-scoring units SWA (ties by unit index)."""
    return grid.to_grid(exact_swa_mask(unit_scores.reshape(grid.count), sparsity)).clone()


def swa_from_layer_order(order: list[int], shape: tuple[int, int], sparsity: float, granularity: str) -> torch.Tensor:
    """(L, K) bool: units SWA in the order of their layer in `order` (within a layer, head index)."""
    grid = unit_grid(granularity, *shape)
    rank = torch.empty(grid.num_layers, dtype=torch.long)
    rank[torch.tensor(order)] = torch.arange(len(order))
    cell_priority = rank[:, None] * grid.num_kv_heads + torch.arange(grid.num_kv_heads)  # (L, K), low = SWA first
    return _swa_units(grid, grid.from_grid(cell_priority).float(), sparsity)


def swa_even_quota(shape: tuple[int, int], sparsity: float) -> torch.Tensor:
    """(L, K) bool with the same number of SWA heads in every layer (+1 in evenly spread layers)."""
    num_layers, num_kv_heads = shape
    n = num_swa_units(num_layers * num_kv_heads, sparsity)
    base, extra = divmod(n, num_layers)
    extra_layers = set(_spread(list(range(num_layers)), extra))
    swa = torch.zeros(num_layers, num_kv_heads, dtype=torch.bool)
    for layer in range(num_layers):
        for j in range(base + (layer in extra_layers)):
            swa[layer, (layer + j) % num_kv_heads] = True  # rotate so no head index is favoured
    return swa


def unit_scores(grid: UnitGrid, scores: torch.Tensor) -> torch.Tensor:
    """(count,) per-unit scores from per-unit scores of any shape, or from (L, K) per-cell scores
    (a unit then scores the mean of its cells)."""
    scores = torch.as_tensor(scores, dtype=torch.float32).cpu()
    if scores.numel() == grid.count:
        return scores.reshape(grid.count)
    if tuple(scores.shape) == grid.shape:
        return torch.stack([torch.stack([scores[c] for c in grid.cells(u)]).mean() for u in range(grid.count)])
    raise ValueError(f"scores must hold one value per unit ({grid.count}) or per cell {grid.shape}, "
                     f"got {tuple(scores.shape)}")


# -- baselines that score the model ---------------------------------------------------------------
@torch.no_grad()
def heuristic_loss_scores(model, calibration: torch.Tensor, granularity: str, window: int,
                          sink_tokens: int = 0, batch_size: int = 4, should_cancel=None) -> torch.Tensor:
    """Loss increase on `calibration` (N, T) token rows when each unit alone becomes SWA: (count,) per unit.

    Costs N_units + 1 passes over the rows; the scores do not depend on the sparsity, so compute them
    once and reuse across sparsities.
    """
    from consa.model.hybrid_attention import install, model_shape

    grid = unit_grid(granularity, *model_shape(model))
    hybrid = getattr(model, "consa_hybrid", None)
    if hybrid is None or hybrid.window != window or hybrid.sink_tokens != sink_tokens:
        hybrid = install(model, window, sink_tokens)
    device = next(model.parameters()).device
    autocast = device.type == "cuda"
    rows = calibration.to(device)

    def loss_with(z) -> float:
        hybrid.set_gates(z)
        total = 0.0
        for i in range(0, rows.shape[0], batch_size):
            batch = rows[i:i + batch_size]  # (B, T)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                total += model(input_ids=batch, labels=batch).loss.float().item() * batch.shape[0]
        return total / rows.shape[0]

    try:
        base = loss_with(None)
        scores = []
        for unit in range(grid.count):
            if should_cancel is not None and should_cancel():
                raise Cancelled(f"cancelled at unit {unit} of the heuristic-loss baseline")
            alone = torch.ones(grid.count)
            alone[unit] = 0.0  # this unit alone slides
            scores.append(loss_with(grid.to_grid(alone).to(device)) - base)
    finally:
        hybrid.set_gates(None)
    return torch.tensor(scores)


def retrieval_head_scores(model, calibration: torch.Tensor, window: int, sink_tokens: int = 0,
                          labels: torch.Tensor | None = None) -> torch.Tensor:
    """(L, K) attention mass beyond the window per KV head (see consa.evaluation.attention_scores)."""
    from consa.evaluation.attention_scores import far_attention_scores

    return far_attention_scores(model, calibration, window, sink_tokens, labels=labels)


def duo_scores(model, calibration: torch.Tensor, window: int, sink_tokens: int = 0, *, tokenizer=None,
               dataset=None, steps: int | None = None, seed: int = 0, should_cancel=None) -> torch.Tensor:
    """(L, K) DuoAttention gates. Trained on `dataset` (rows, labels) when given; else on passkey
    documents built from the calibration text when a tokenizer is at hand (their recipe); else on the
    calibration text itself, every token scored."""
    from consa.evaluation import duo

    if dataset is not None:
        rows, labels = dataset if isinstance(dataset, tuple) else (dataset, None)
    else:
        rows, labels = calibration, None
        if tokenizer is not None:
            try:
                rows, labels = duo.passkey_rows(tokenizer, calibration.cpu(), count=max(calibration.shape[0], 16),
                                                seed=seed)
            except DataError:  # rows too short to hold the keys: distil on the text itself
                pass
    return duo.duo_head_scores(model, rows, labels, window=window, sink_tokens=sink_tokens,
                               steps=steps or duo.DEFAULT_STEPS, seed=seed, should_cancel=should_cancel)


# -- registry ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Baseline:
    """A training-free allocation. `swa(grid, shape, sparsity, seed)` gives its (L, K) SWA mask and what the
    manifest records of the run; a scored baseline instead ranks units by `scores(model, calibration,
    granularity, window, **options)`. `finer_than_layers`: only for granularities that split layers."""

    name: str
    swa: Callable | None = None
    scores: Callable | None = None
    finer_than_layers: bool = False


def _layer_rule(rule: str) -> Baseline:
    return Baseline(rule, swa=lambda grid, shape, sparsity, seed: (
        swa_from_layer_order(layer_order(rule, grid.num_layers, seed), shape, sparsity, grid.name), {}))


def _random_units(grid, shape, sparsity, seed):
    perm = torch.randperm(grid.count, generator=torch.Generator().manual_seed(seed))
    rank = torch.empty_like(perm)
    rank[perm] = torch.arange(perm.numel())  # unit perm[0] gets the lowest score, so it goes SWA first
    return _swa_units(grid, rank.float(), sparsity), {"training": {"seed": seed}}


# Every baseline, by name, in the order reports list them. A new one is one entry here (plus its tests);
# a scored one that a search may warm-start from also adds its name to consa.core.config.WARM_STARTS.
BASELINES: dict[str, Baseline] = {b.name: b for b in (
    *(_layer_rule(rule) for rule in ("interleave-1:1", "interleave-3:1", "interleave-5:1", "bottom", "top")),
    Baseline("even", swa=lambda grid, shape, sparsity, seed: (swa_even_quota(shape, sparsity), {}),
             finer_than_layers=True),
    Baseline("random", swa=_random_units),
    Baseline("heuristic-loss", scores=lambda model, calibration, granularity, window, *, sink_tokens=0,
             should_cancel=None, **_: heuristic_loss_scores(model, calibration, granularity, window, sink_tokens,
                                                            should_cancel=should_cancel)),
    Baseline("retrieval-heads", scores=lambda model, calibration, granularity, window, *, sink_tokens=0, **_:
             retrieval_head_scores(model, calibration, window, sink_tokens)),
    Baseline("duo", scores=lambda model, calibration, granularity, window, *, sink_tokens=0, tokenizer=None,
             dataset=None, steps=None, seed=0, should_cancel=None: duo_scores(
                 model, calibration, window, sink_tokens, tokenizer=tokenizer, dataset=dataset, steps=steps, seed=seed,
                 should_cancel=should_cancel)),
)}
SCORED = tuple(name for name, b in BASELINES.items() if b.scores is not None)  # they score the model on rows


def needs_calibration(name: str) -> bool:
    """Whether a baseline scores the model on calibration rows (it then needs a model and rows)."""
    return get_baseline(name).scores is not None


def get_baseline(name: str) -> Baseline:
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}: expected one of {', '.join(BASELINES)}")
    return BASELINES[name]


def _splits_layers(granularity: str) -> bool:
    """Whether a granularity's units are finer than layers (what `even` spreads over layers)."""
    return unit_grid(granularity, 1, 2).count > 1


def baseline_names(granularity: str | None = None) -> list[str]:
    """Every baseline, or those that apply to a granularity (`even` needs units finer than layers)."""
    return [name for name, b in BASELINES.items()
            if granularity is None or not b.finer_than_layers or _splits_layers(granularity)]


def baseline_scores(name: str, model, calibration: torch.Tensor, granularity: str, window: int, *,
                    sink_tokens: int = 0, tokenizer=None, dataset=None, steps: int | None = None,
                    seed: int = 0, should_cancel=None) -> torch.Tensor:
    """The scores a scored baseline ranks units by (per unit, or per (layer, kv_head) cell).

    They do not depend on the sparsity: compute them once and pass them to build_baseline as `scores`.
    """
    b = get_baseline(name)
    if b.scores is None:
        raise ValueError(f"{name!r} does not score the model: scored baselines are {', '.join(SCORED)}")
    return b.scores(model, calibration, granularity, window, sink_tokens=sink_tokens, tokenizer=tokenizer,
                    dataset=dataset, steps=steps, seed=seed, should_cancel=should_cancel)


def build_baseline(name: str, model_shape: tuple[int, int], sparsity: float, granularity: str, window: int, *,
                   seed: int = 0, sink_tokens: int = 0, model_name: str = "", model=None,
                   calibration: torch.Tensor | None = None, scores: torch.Tensor | None = None,
                   tokenizer=None, steps: int | None = None, should_cancel=None) -> Allocation:
    """An Allocation of baseline `name` with exactly round(sparsity * N) SWA units.

    Scored baselines (SCORED) need either precomputed `scores` (see baseline_scores) or a `model`
    plus `calibration` token rows (N, T); `duo` also uses a `tokenizer` to build its passkey rows and
    trains its gates `steps` steps (default: duo.DEFAULT_STEPS).
    """
    grid = unit_grid(granularity, *model_shape)
    b = get_baseline(name)
    num_swa_units(grid.count, sparsity)  # validates the sparsity
    common = dict(granularity=granularity, sparsity=sparsity, window=window, sink_tokens=sink_tokens,
                  model_name=model_name)
    if b.finer_than_layers and not _splits_layers(granularity):
        raise ValueError(f"the `{name}` baseline spreads heads over layers: {granularity} units are whole layers")
    if b.scores is None:
        swa, record = b.swa(grid, model_shape, sparsity, seed)
        return _allocation(swa, method=name, **record, **common)
    if scores is None:
        if model is None or calibration is None:
            raise ValueError(f"{name} needs scores, or a model and calibration rows")
        scores = baseline_scores(name, model, calibration, granularity, window, sink_tokens=sink_tokens,
                                 tokenizer=tokenizer, steps=steps, seed=seed, should_cancel=should_cancel)
    per_unit = unit_scores(grid, scores)
    return _allocation(_swa_units(grid, per_unit, sparsity), method=name,
                       evaluation={f"{name.replace('-', '_')}_scores": per_unit.tolist()}, **common)
