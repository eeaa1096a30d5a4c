"""What the quality benchmark compares, and the rule that picks the default.

VARIANTS are the learned methods (search settings on top of SearchConfig's defaults); BASELINES the
allocations they are compared with; `screen_score` the one number a variant is ranked by, fixed before
any screen ran; `pick_default` the rule that keeps or replaces the default over every cell.
"""

import math
import statistics

from consa.evaluation import baselines as consa_baselines

# Search variants: SearchConfig overrides on top of its defaults; the method is `learned-<name>`.
VARIANTS = {
    "lm": {"objective": "lm"},
    "distill": {"objective": "distill"},
    "lm+distill": {"objective": "lm+distill"},
    "lm-warm": {"objective": "lm", "warm_start": "heuristic-loss"},
    "lm-anneal": {"objective": "lm", "temperature_final": 0.25},
    "lm-ret50": {"objective": "lm", "retrieval_ratio": 0.5},
    "lm-keys8": {"objective": "lm", "retrieval_keys": 8},
    "lm-refine": {"objective": "lm", "refine_swaps": 4},
    "lm-steps2x": {"objective": "lm", "steps": 500},
    "distill-steps2x": {"objective": "distill", "steps": 500},
    "lm-batch2": {"objective": "lm", "batch_size": 2},
    "lm-wu50": {"objective": "lm", "warmup_frac": 0.5},
    "distill-hidden": {"objective": "distill-hidden"},
    "distill-ret10": {"objective": "distill", "retrieval_ratio": 0.1},
    "distill-batch2": {"objective": "distill", "batch_size": 2},
    "distill-wu50": {"objective": "distill", "warmup_frac": 0.5},
    "lm-rerun": {"objective": "lm"},  # the default again: does it reproduce the records of another session?
    "lm-ret0": {"objective": "lm", "retrieval_ratio": 0.0},  # text only: the search on the heuristic's own data
    "distill-ret0": {"objective": "distill", "retrieval_ratio": 0.0},
    "lm-q4": {"objective": "lm", "retrieval_queries": 4},  # every key of a retrieval row asked: 4x the answers
    "distill-q4": {"objective": "distill", "retrieval_queries": 4},
    # issue 25's follow-ups on the 28x8 testbed, on top of lm-q4: a joint refinement of the boundary units,
    # larger batches, more retrieval rows, and a start from duo's order (duo led on loss there)
    "q4-refine": {"objective": "lm", "retrieval_queries": 4, "refine_swaps": 4},
    "q4-batch2": {"objective": "lm", "retrieval_queries": 4, "batch_size": 2},
    "q4-ret50": {"objective": "lm", "retrieval_queries": 4, "retrieval_ratio": 0.5},
    "q4-duo": {"objective": "lm", "retrieval_queries": 4, "warm_start": "duo", "warm_start_spread": 4.0},
}

# Bench-only variants of a baseline: retrieval-heads scored at the answers of retrieval rows (the
# attention that retrieves) instead of every query of calibration text.
ALIASES = {"retrieval-heads-answers": "retrieval-heads"}
# The baselines the bench runs, in the order it runs them: consa's registry, then the aliases; name -> whether
# it scores the model first (on calibration rows, once per seed: those run once per --seeds seed; the others once).
BASELINES = {**{name: b.scores is not None for name, b in consa_baselines.BASELINES.items()},
             **{alias: consa_baselines.BASELINES[name].scores is not None for alias, name in ALIASES.items()}}
SCORED = tuple(name for name, scored in BASELINES.items() if scored)

LOSS_WEIGHT = 20.0  # screen_score: 1% more loss costs as much as 20% of full attention's retrieval


def parse_variant(spec: str) -> tuple[str, dict]:
    """"lm-warm" -> ("lm-warm", VARIANTS["lm-warm"]); "x=objective:lm+refine_swaps:2" -> ("x", {...})."""
    from consa.core.config import SearchConfig, check_setting, setting_fields

    name, _, body = spec.partition("=")
    if not body:
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}: expected one of {', '.join(VARIANTS)} or name=key:value")
        return name, dict(VARIANTS[name])
    kinds = {n: kind for n, kind, *_ in setting_fields()}
    overrides = {}
    for item in body.split("+"):
        key, _, value = item.partition(":")
        if key not in kinds:
            raise SystemExit(f"unknown search setting {key!r} in variant {spec!r}")
        overrides[key] = check_setting(key, value if kinds[key] is str else kinds[key](value))
    SearchConfig(model="m", sparsity=0.5, **overrides)  # fail now, not on the GPU
    return name, overrides


def screen_score(records: list[dict], full: dict) -> float:
    """Mean over runs of (retrieval / full's) - LOSS_WEIGHT x (loss / full's - 1): the rule that picks
    the default, fixed before the screen ran."""
    retrieval_full = full["retrieval_acc"] or 1.0  # a model that retrieves nothing (tiny test models)
    return statistics.fmean(r["retrieval_acc"] / retrieval_full - LOSS_WEIGHT * (r["loss"] / full["loss"] - 1)
                            for r in records)


def pick_default(records: list[dict], variants: dict) -> tuple[str | None, dict]:
    """The default among `variants` ({name: settings}, the incumbent first): the best screen_score,
    compared on the cells and seeds that every variant with records finished (a deadline that cut one
    short must not compare it on other cells; one that finished none is left out). It replaces the
    incumbent only when its advantage, paired by (cell, seed), exceeds two standard errors: ties
    within the noise are ties (the issue's own rule), and the incumbent is what users already run."""
    full = next((r for r in records if r["method"] == "full"), None)
    key = lambda r: (r["granularity"], r["sparsity"], r.get("seed"))  # noqa: E731
    finished = {name: {key(r): r for r in records if r["method"] == f"learned-{name}"} for name in variants}
    left_out = [name for name, runs in finished.items() if not runs]
    finished = {name: runs for name, runs in finished.items() if runs}
    if full is None or not finished:
        return None, {}
    common = sorted(set.intersection(*(set(runs) for runs in finished.values())))
    scores = {name: {"score": round(screen_score([runs[k] for k in common], full), 4), "settings": variants[name],
                     "runs": len(common)} for name, runs in finished.items()}
    incumbent = next(iter(variants))
    best = max(scores, key=lambda name: scores[name]["score"])
    winner = best if incumbent not in finished else incumbent
    if incumbent in finished and best != incumbent and len(common) > 1:
        gains = [screen_score([finished[best][k]], full) - screen_score([finished[incumbent][k]], full)
                 for k in common]
        margin = 2 * statistics.stdev(gains) / math.sqrt(len(gains))
        scores[best].update(paired_gain=round(statistics.fmean(gains), 4), paired_margin=round(margin, 4))
        if statistics.fmean(gains) > margin:
            winner = best
    return winner, {"scores": scores, "left_out": left_out, "incumbent": incumbent}
