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

For `kv_head` granularity the layer rules keep their layer order and switch whole layers first; when
the budget is not a multiple of kv_heads, the next layer in the order gets the remaining heads
(lowest head indices first). `random` and `heuristic-loss` rank individual heads.
"""

import random as _random

import torch

from consa.gates import exact_swa_mask
from consa.manifest import Allocation
from consa.units import check_granularity


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


def swa_from_layer_order(order: list[int], shape: tuple[int, int], sparsity: float, granularity: str) -> torch.Tensor:
    """(L, K) bool: whole layers in `order` become SWA; kv_head fills the last layer head by head."""
    num_layers, num_kv_heads = shape
    swa = torch.zeros(num_layers, num_kv_heads, dtype=torch.bool)
    if granularity == "layer":
        for layer in order[:num_swa_units(num_layers, sparsity)]:
            swa[layer] = True
        return swa
    units = [(layer, h) for layer in order for h in range(num_kv_heads)]
    for layer, h in units[:num_swa_units(num_layers * num_kv_heads, sparsity)]:
        swa[layer, h] = True
    return swa


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


def swa_from_scores(scores: torch.Tensor, sparsity: float, granularity: str, num_kv_heads: int) -> torch.Tensor:
    """scores: (L,) for layer or (L, K) for kv_head, higher = more worth keeping full. Returns (L, K) bool."""
    swa = exact_swa_mask(scores, sparsity)  # lowest scores SWA, ties by index
    if granularity == "layer":
        swa = swa.flatten()[:, None].expand(-1, num_kv_heads)
    return swa.clone()


# -- the training-free heuristic ------------------------------------------------------------------
@torch.no_grad()
def heuristic_loss_scores(model, calibration: torch.Tensor, granularity: str, window: int,
                          sink_tokens: int = 0, batch_size: int = 4) -> torch.Tensor:
    """Loss increase on `calibration` (N, T) token rows when each unit alone becomes SWA.

    Returns (L,) for layer granularity, (L, K) for kv_head. Costs N_units + 1 passes over the rows;
    the scores do not depend on the sparsity, so compute them once and reuse across sparsities.
    """
    from consa.hybrid_attention import install, model_shape

    check_granularity(granularity)
    num_layers, num_kv_heads = model_shape(model)
    hybrid = model.consa_hybrid if getattr(model, "consa_hybrid", None) is not None else None
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

    units = [(layer,) for layer in range(num_layers)] if granularity == "layer" else \
        [(layer, h) for layer in range(num_layers) for h in range(num_kv_heads)]
    try:
        base = loss_with(None)
        scores = []
        for unit in units:
            z = torch.ones(num_layers, num_kv_heads, device=device)
            z[unit] = 0.0  # this layer (all heads) or this one head slides
            scores.append(loss_with(z) - base)
    finally:
        hybrid.set_gates(None)
    scores = torch.tensor(scores)
    return scores if granularity == "layer" else scores.view(num_layers, num_kv_heads)


# -- registry ---------------------------------------------------------------------------------------
LAYER_RULES = ("interleave-1:1", "interleave-3:1", "interleave-5:1", "bottom", "top")
BASELINES = (*LAYER_RULES, "even", "random", "heuristic-loss")


def baseline_names(granularity: str | None = None) -> list[str]:
    """Every baseline, or those that apply to a granularity (`even` is kv_head only)."""
    if granularity == "layer":
        return [n for n in BASELINES if n != "even"]
    return list(BASELINES)


def build_baseline(name: str, model_shape: tuple[int, int], sparsity: float, granularity: str, window: int, *,
                   seed: int = 0, sink_tokens: int = 0, model_name: str = "", model=None,
                   calibration: torch.Tensor | None = None, scores: torch.Tensor | None = None) -> Allocation:
    """An Allocation of baseline `name` with exactly round(sparsity * N) SWA units.

    `heuristic-loss` needs either precomputed `scores` (see heuristic_loss_scores) or a `model`
    plus `calibration` token rows (N, T).
    """
    check_granularity(granularity)
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}: expected one of {', '.join(BASELINES)}")
    num_layers, num_kv_heads = model_shape
    common = dict(granularity=granularity, sparsity=sparsity, window=window, sink_tokens=sink_tokens,
                  model_name=model_name)
    if name == "even":
        if granularity != "kv_head":
            raise ValueError("the `even` baseline spreads heads over layers: it needs kv_head granularity")
        return _allocation(swa_even_quota(model_shape, sparsity), method=name, **common)
    if name == "random" and granularity == "kv_head":
        perm = torch.randperm(num_layers * num_kv_heads, generator=torch.Generator().manual_seed(seed))
        rank = torch.empty_like(perm)
        rank[perm] = torch.arange(perm.numel())  # unit perm[0] gets the lowest score, so it goes SWA first
        swa = swa_from_scores(rank.view(num_layers, num_kv_heads).float(), sparsity, granularity, num_kv_heads)
        return _allocation(swa, method=name, training={"seed": seed}, **common)
    if name == "heuristic-loss":
        if scores is None:
            if model is None or calibration is None:
                raise ValueError("heuristic-loss needs scores, or a model and calibration rows")
            scores = heuristic_loss_scores(model, calibration, granularity, window, sink_tokens)
        expected = (num_layers,) if granularity == "layer" else (num_layers, num_kv_heads)
        if tuple(scores.shape) != expected:
            raise ValueError(f"heuristic scores must be shaped {expected}, got {tuple(scores.shape)}")
        swa = swa_from_scores(scores, sparsity, granularity, num_kv_heads)
        return _allocation(swa, method=name, evaluation={"heuristic_scores": scores.tolist()}, **common)
    order = layer_order(name, num_layers, seed)
    extra = {"training": {"seed": seed}} if name == "random" else {}
    return _allocation(swa_from_layer_order(order, model_shape, sparsity, granularity), method=name, **common, **extra)
