"""Quality benchmark: learned allocations vs every baseline vs full attention, on one model.

For each granularity x sparsity: learned allocations (consa.pipeline.run_allocation, one per search
variant and seed) and every baseline at the same exact sparsity (random: several seeds, mean ± std),
all evaluated on the same held-out rows and retrieval prompts. Writes quality.json (a list of
records), quality.md (the table), screen.json (the screening, when asked) and heatmaps.

    python bench/quality.py --model .models/qwen3-code-26m --out $OUT --pack --workers 6 \\
        --screen lm,distill,lm+distill,lm-warm,lm-anneal,lm-ret50,lm-keys8,lm-refine
    python bench/quality.py ... --variants lm,distill --seeds 0,1,2 --pick-default  # every cell, 3 seeds

With --screen, the variants are first compared at --screen-sparsity (both granularities, every
--screen-seeds seed); the best one, and combinations of the knobs that helped, are kept by one
rule fixed up front (`screen_score`), and the winner then runs every cell: its records carry
"default": true. Without it, --variants run every cell and the first one is the default; with
--pick-default, the default is instead the variant with the best `screen_score` over all its cells.

Every learned variant and every scored baseline runs once per --seeds seed in every cell (the rules
and random do not depend on it). quality_summary.json (and the end of quality.md) holds, per cell,
each method's mean ± sample std over its runs and the default's verdict against every other method
on loss and on retrieval: win, loss, or tie when the difference of the means is within two standard
errors of it.

Searches and evaluations run in --workers processes that share the one GPU: a 26M model leaves
most of an H200 idle, so several searches at once finish sooner than one after another.

Defaults are the testbed setting: window 256, 4k context, held-out text = this machine's Python
standard library, training text = this machine's site-packages (a different directory).
"""

import argparse
import concurrent.futures as cf
import json
import math
import multiprocessing
import os
import statistics
import sys
import sysconfig
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

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
}
RULES = ("interleave-1:1", "interleave-3:1", "interleave-5:1", "bottom", "top", "even")
SCORED = ("heuristic-loss", "retrieval-heads", "duo", "retrieval-heads-answers")
# Bench-only variants of a baseline: retrieval-heads scored at the answers of retrieval rows (the
# attention that retrieves) instead of every query of calibration text.
ALIASES = {"retrieval-heads-answers": "retrieval-heads"}
# Kept small on purpose: the random mean over seeds, and the per-unit detail, go in as extra fields.
RECORD_KEYS = ("loss", "loss_pos_lt_window", "loss_pos_ge_window", "loss_pos_ge_1024", "retrieval_acc",
               "needle_grid", "kv_bytes", "kv_bytes_ratio")
LOSS_WEIGHT = 20.0  # screen_score: 1% more loss costs as much as 20% of full attention's retrieval
METRICS = {"loss": -1, "retrieval_acc": 1}  # the summary's metrics: -1 = lower is better


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=".models/qwen3-code-26m", help="local model directory")
    p.add_argument("--eval-data", default=os.path.dirname(os.__file__), help="held-out text (default: Python stdlib)")
    p.add_argument("--train-data", default=sysconfig.get_paths()["purelib"], help="search text (default: site-packages)")
    p.add_argument("--out", default=None, help="output directory (default: bench/results/current + bench/heatmaps)")
    p.add_argument("--pack", action="store_true", help="pack heatmaps into heatmaps.tar.gz (few files for $OUT)")
    p.add_argument("--sparsities", default="0.25,0.5,0.75")
    p.add_argument("--granularities", default="layer,kv_head")
    p.add_argument("--variants", default="lm,distill", help=f"learned variants for every cell ({','.join(VARIANTS)}, "
                                                            "or name=key:value+key:value)")
    p.add_argument("--screen", default="", help="variants to screen first (the winner joins --variants as default)")
    p.add_argument("--screen-sparsity", type=float, default=0.5)
    p.add_argument("--screen-seeds", default="0,1")
    p.add_argument("--seeds", default="0", help="seeds of every learned variant and scored baseline in every cell")
    p.add_argument("--pick-default", action="store_true", help="after every cell ran, the default is the variant "
                                                               "with the best screen_score over all its records")
    p.add_argument("--report-only", action="store_true", help="run nothing: rewrite the reports (and pick the "
                   "default, with --pick-default) from the --resume records")
    p.add_argument("--combine", type=int, default=2, help="combinations of helpful knobs tried after the screen")
    p.add_argument("--baselines", default="all", help="baseline names, 'all' or 'none'")
    p.add_argument("--methods", default=None, help="instead of --variants/--baselines: full, learned-<variant> "
                                                   "and baseline names, comma-separated")
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=4096, help="evaluation context length")
    p.add_argument("--eval-sequences", type=int, default=32)
    p.add_argument("--retrieval-docs", type=int, default=200)
    p.add_argument("--eval-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=250, help="search steps per learned allocation (and duo's steps)")
    p.add_argument("--search-seq-len", type=int, default=4096)
    p.add_argument("--search-batch", type=int, default=1)
    p.add_argument("--retrieval-ratio", type=float, default=None,
                   help="share of retrieval docs in search data (default: SearchConfig's, 0.25 on the testbed)")
    p.add_argument("--calibration-sequences", type=int, default=8, help="text rows scored by the training-free "
                                                                        "baselines")
    p.add_argument("--random-seeds", type=int, default=3)
    p.add_argument("--workers", type=int, default=1, help="processes sharing the device")
    p.add_argument("--deadline", type=float, default=0, help="seconds: stop submitting work after this and save "
                                                             "(0 = none)")
    p.add_argument("--resume", default=None, help="a quality.json whose finished records are kept, not re-run")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    args.sparsities = [float(s) for s in args.sparsities.split(",")]
    if args.methods is not None:
        methods = args.methods.split(",")
        known = {"full", *(f"learned-{v}" for v in VARIANTS), *RULES, "random", *SCORED}
        unknown = [m for m in methods if m not in known]
        if unknown:
            p.error(f"unknown method(s): {', '.join(unknown)}")
        args.variants = ",".join(m.removeprefix("learned-") for m in methods if m.startswith("learned-"))
        args.baselines = ",".join(m for m in methods if m in (*RULES, "random", *SCORED)) or "none"
    args.granularities = args.granularities.split(",")
    args.variants = [parse_variant(v) for v in args.variants.split(",") if v]
    args.screen = [parse_variant(v) for v in args.screen.split(",") if v]
    args.screen_seeds = [int(s) for s in args.screen_seeds.split(",")]
    args.seeds = [int(s) for s in args.seeds.split(",")]
    if args.report_only and not args.resume:
        raise SystemExit("--report-only rewrites the reports of a finished run: name its quality.json with --resume")
    return args


def parse_variant(spec: str) -> tuple[str, dict]:
    """"lm-warm" -> ("lm-warm", VARIANTS["lm-warm"]); "x=objective:lm+refine_swaps:2" -> ("x", {...})."""
    from consa.config import SearchConfig, check_setting, setting_fields

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


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def pattern(allocation) -> list[str]:
    """One string per layer (bottom first), F = full, . = SWA: where the FA units land, at a glance."""
    return ["".join("F" if v == "full" else "." for v in row) for row in allocation.assignment]


def record_of(method, granularity, sparsity, result, allocation=None, **extra) -> dict:
    rec = {"method": method, "granularity": granularity, "sparsity": sparsity,
           **{k: result[k] for k in RECORD_KEYS if k in result}, **extra}
    if allocation is not None:
        rec["pattern"] = pattern(allocation)
    return rec


def mean_record(method, granularity, sparsity, runs: list[dict], **extra) -> dict:
    """Mean ± std over seeded runs of one method."""
    rec = {"method": method, "granularity": granularity, "sparsity": sparsity, **extra}
    for key in ("loss", "loss_pos_ge_window", "retrieval_acc", "kv_bytes_ratio"):
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            rec[key] = statistics.fmean(values)
            rec[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    rec["runs"] = runs
    return rec


def screen_score(records: list[dict], full: dict) -> float:
    """Mean over runs of (retrieval / full's) - LOSS_WEIGHT x (loss / full's - 1): the rule that picks
    the default, fixed before the screen ran."""
    retrieval_full = full["retrieval_acc"] or 1.0  # a model that retrieves nothing (tiny test models)
    return statistics.fmean(r["retrieval_acc"] / retrieval_full - LOSS_WEIGHT * (r["loss"] / full["loss"] - 1)
                            for r in records)


def summarize(records: list[dict], default: str | None, grid: list[tuple]) -> dict:
    """Per (method, granularity, sparsity): n, mean and sample std of each metric over its runs (random:
    its seeds' runs); then the default against every other method of each cell, per metric. A difference
    within 2 standard errors of it, sqrt(sd_a^2/n_a + sd_b^2/n_b), is a tie; a method with one run (the
    rules) borrows the other's sd, so two single runs have no noise and any difference decides."""
    runs: dict = {}
    for r in records:
        if r.get("granularity") is not None:  # not full attention
            runs.setdefault((r["granularity"], r["sparsity"], r["method"]), []).extend(r.get("runs") or [r])
    cells = []
    for (g, s, method), rs in sorted(runs.items()):
        cell = {"method": method, "granularity": g, "sparsity": s, "n": len(rs)}
        for key in METRICS:
            values = [r[key] for r in rs if r.get(key) is not None]
            cell[key] = statistics.fmean(values) if values else None
            cell[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        cells.append(cell)
    verdicts = []
    mine = {(c["granularity"], c["sparsity"]): c for c in cells if c["method"] == f"learned-{default}"}
    for c in cells:
        d = mine.get((c["granularity"], c["sparsity"]))
        if d is None or c is d:
            continue
        for key, sign in METRICS.items():
            if d[key] is None or c[key] is None:
                continue
            sd_d = d[f"{key}_std"] if d["n"] > 1 else c[f"{key}_std"]
            sd_c = c[f"{key}_std"] if c["n"] > 1 else sd_d
            margin = 2 * math.sqrt(sd_d ** 2 / d["n"] + sd_c ** 2 / c["n"])
            better = sign * (d[key] - c[key])  # > 0: the default is better
            verdict = "tie" if abs(better) <= margin else "win" if better > 0 else "loss"
            verdicts.append({"granularity": c["granularity"], "sparsity": c["sparsity"], "method": c["method"],
                             "metric": key, "verdict": verdict, "default": d[key], "other": c[key],
                             "margin": margin})
    met = default is not None and all(cell in mine for cell in grid) and all(v["verdict"] != "loss" for v in verdicts)
    return {"default": f"learned-{default}" if default else None, "cells": cells, "verdicts": verdicts,
            "all_cells_met": met}


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


def verdict_counts(summary: dict) -> str:
    out = []
    for key in METRICS:
        verdicts = [v["verdict"] for v in summary["verdicts"] if v["metric"] == key]
        out.append(f"{key} " + " / ".join(f"{verdicts.count(x)} {x}" for x in ("win", "tie", "loss")))
    return ", ".join(out) + f"; all cells met: {'yes' if summary['all_cells_met'] else 'no'}"


def summary_markdown(summary: dict) -> str:
    def num(cell, key, digits):
        if cell[key] is None:
            return "–"
        return f"{cell[key]:.{digits}f}" + (f" ± {cell[key + '_std']:.{digits}f}" if cell["n"] > 1 else "")

    lines = [f"\n\n## Per cell: mean ± sample std over runs (default {summary['default']})\n",
             "| granularity | s | method | n | loss | retrieval |", "|---|---|---|---|---|---|"]
    for c in summary["cells"]:
        name = f"**{c['method']}**" if c["method"] == summary["default"] else c["method"]
        lines.append(f"| {c['granularity']} | {c['sparsity']:.2f} | {name} | {c['n']} | {num(c, 'loss', 4)} | "
                     f"{num(c, 'retrieval_acc', 3)} |")
    lines.append(f"\nVerdicts of the default (tie: within 2 standard errors): {verdict_counts(summary)}. "
                 "Every method it does not beat on both (default vs other; a tie is within the margin):\n")
    rows: dict = {}
    for v in summary["verdicts"]:
        if v["verdict"] != "win":
            rows.setdefault((v["granularity"], v["sparsity"], v["method"]), []).append(
                f"{v['metric']} {v['verdict']} ({v['default']:.4f} vs {v['other']:.4f}, margin {v['margin']:.4f})")
    lines += [f"- {g} {s:.2f} vs {method}: " + ", ".join(parts) for (g, s, method), parts in rows.items()]
    return "\n".join(lines) + "\n"


# -- worker processes: each holds the model, the eval set and the search data ---------------------
_state: dict = {}


def load_worker(args, counter=None):
    """A worker's model (on its GPU: workers spread round-robin over them), tokenizer and the benchmark's
    eval set. bench/pareto.py evaluates on exactly this set."""
    import torch

    from consa.config import SearchConfig
    from consa.evaluation import build_eval_set
    from consa.loading import load_for_search

    torch.manual_seed(0)
    device = args.device
    if device == "auto" and torch.cuda.device_count() > 1 and counter is not None:
        with counter.get_lock():
            device, counter.value = f"cuda:{counter.value % torch.cuda.device_count()}", counter.value + 1
        torch.cuda.set_device(device)  # compiled kernels launch on the current device
    model, tokenizer = load_for_search(SearchConfig(model=args.model, sparsity=0.5), device)  # a search's dtype
    eval_set = build_eval_set(tokenizer, args.eval_data, seq_len=args.seq_len, num_sequences=args.eval_sequences,
                              retrieval_docs=args.retrieval_docs, seed=0)
    return model, tokenizer, eval_set


def _setup(args, counter=None) -> None:
    from consa.hybrid_attention import model_shape

    model, tokenizer, eval_set = load_worker(args, counter)
    _state.update(args=args, model=model, tokenizer=tokenizer, eval_set=eval_set, shape=model_shape(model),
                  data={}, tmp=Path(tempfile.mkdtemp(prefix="quality-")))


def _dataset(config, rows: int):
    """The search data of one seed (cached per worker): text rows + retrieval rows, labelled."""
    from consa import data as data_mod

    key = (config.seed, config.retrieval_ratio, config.retrieval_keys, config.retrieval_queries, rows)
    if key not in _state["data"]:
        a = _state["args"]
        _state["data"][key] = data_mod.build_dataset(
            _state["tokenizer"], a.train_data, a.search_seq_len, rows, retrieval_ratio=config.retrieval_ratio,
            seed=config.seed, num_keys=config.retrieval_keys, queries=config.retrieval_queries, with_labels=True)
    return _state["data"][key]


def _evaluate(allocation) -> dict:
    from consa.evaluation import evaluate

    a, model = _state["args"], _state["model"]
    model.eval()
    return evaluate(model, _state["tokenizer"], allocation, data=_state["eval_set"], window=a.window,
                    batch_size=a.eval_batch)


def _search_config(a, **settings):
    from consa.config import SearchConfig

    # The variants were defined, and recorded, with one query per retrieval row (the default until session 6);
    # lm-q4, today's default, asks for every key.
    base = dict(model=a.model, sparsity=0.5, window=a.window, seq_len=a.search_seq_len, batch_size=a.search_batch,
                steps=a.steps, retrieval_queries=1)
    if a.retrieval_ratio is not None:
        base["retrieval_ratio"] = a.retrieval_ratio
    return SearchConfig(**{**base, **settings})


def job_full() -> list[dict]:
    result = _evaluate(None)
    return [record_of("full", None, 0.0, result)]


def job_search(name: str, overrides: dict, granularity: str, sparsity: float, seed: int, heatmap_dir) -> list[dict]:
    """One learned allocation through the pipeline's recipe, evaluated on the shared eval set."""
    from consa.pipeline import run_allocation
    from consa.refine import ROWS

    config = _search_config(_state["args"], sparsity=sparsity, granularity=granularity, seed=seed, **overrides)
    rows = config.steps * config.batch_size + ROWS  # held-out rows for a refinement, unused otherwise
    dataset = _dataset(config, rows)
    t = time.time()
    run = run_allocation(config, _state["tmp"] / f"{name}-{granularity}-{sparsity}-{seed}", evaluate=False,
                         heatmap=heatmap_dir is not None, model=_state["model"], tokenizer=_state["tokenizer"],
                         dataset=dataset)
    seconds = time.time() - t
    allocation = run.search.allocation
    history = run.search.history
    trace = [(r["step"], r["target"], r["sparsity"], r["loss"]) for r in history]
    extra = {"seed": seed, "settings": overrides, "search_seconds": round(seconds, 1),
             "s_per_step": round(seconds / config.steps, 4), "trace": trace[::max(1, len(trace) // 12)] + trace[-1:]}
    if "refine" in allocation.training:
        extra["refine"] = allocation.training["refine"]
    if heatmap_dir is not None and "heatmap.png" in run.artifacts:
        target = Path(heatmap_dir) / f"{granularity}_s{sparsity:g}_learned-{name}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(run.artifacts["heatmap.png"], target)
    return [record_of(f"learned-{name}", granularity, sparsity, _evaluate(allocation), allocation, **extra)]


def job_scores(seed: int, granularities: list[str], names: list[str]) -> dict:
    """The scored baselines' scores (they do not depend on the sparsity): {(name, granularity): scores}."""
    from consa import data as data_mod
    from consa.baselines import baseline_scores
    from consa.warm_start import calibration_of

    a, model = _state["args"], _state["model"]
    config = _search_config(a, seed=seed)
    rows, labels = _dataset(config, a.steps * a.search_batch + 16)
    calibration = calibration_of(rows, labels, a.calibration_sequences)
    out, seconds = {}, {}
    for name in names:
        t = time.time()
        if name == "duo":  # per KV head whatever the granularity: train once, on the search data
            cells = baseline_scores("duo", model, calibration, granularities[0], a.window, dataset=(rows, labels),
                                    steps=a.steps, seed=seed)
            out.update({(name, g): cells for g in granularities})
        elif name == "retrieval-heads":
            cells = baseline_scores(name, model, calibration, granularities[0], a.window)
            out.update({(name, g): cells for g in granularities})
        elif name == "retrieval-heads-answers":
            from consa.attention_scores import far_attention_scores

            retrieval = (labels == data_mod.IGNORE).any(1)
            cells = far_attention_scores(model, rows[retrieval][:16], a.window, labels=labels[retrieval][:16])
            out.update({(name, g): cells for g in granularities})
        else:
            for g in granularities:
                out[(name, g)] = baseline_scores(name, model, calibration, g, a.window)
        seconds[name] = round(time.time() - t, 1)
    return {"scores": out, "seconds": seconds}


def job_baselines(granularity: str, sparsity: float, seed: int, names: list[str], scores: dict, seconds: dict,
                  heatmap_dir) -> list[dict]:
    from consa.baselines import build_baseline

    a, shape = _state["args"], _state["shape"]
    records = []
    for name in names:
        if name == "random":
            runs = []
            for r in range(a.random_seeds):
                allocation = build_baseline("random", shape, sparsity, granularity, a.window, seed=r)
                runs.append(record_of("random", granularity, sparsity, _evaluate(allocation), allocation, seed=r))
            records.append(mean_record("random", granularity, sparsity, runs))
            continue
        allocation = build_baseline(ALIASES.get(name, name), shape, sparsity, granularity, a.window, seed=seed,
                                    scores=scores.get((name, granularity)))
        extra = {"seed": seed} if name in SCORED else {}
        if name in seconds:
            extra["scoring_seconds"] = seconds[name]
        if heatmap_dir is not None:
            from consa.heatmap import save_heatmap

            extra["heatmap"] = str(save_heatmap(allocation, Path(heatmap_dir) /
                                                f"{granularity}_s{sparsity:g}_{name.replace(':', 'to')}.png"))
        records.append(record_of(name, granularity, sparsity, _evaluate(allocation), allocation, **extra))
    return records


def _call(fn_name: str, *args):
    return globals()[fn_name](*args)


# -- the orchestration ----------------------------------------------------------------------------
class InlineExecutor:
    """One worker: jobs run in this process as they are submitted (no pickling, easy to debug)."""

    def __init__(self, args):
        _setup(args)

    def submit(self, fn, *args):
        future = cf.Future()
        try:
            future.set_result(fn(*args))
        except Exception as e:
            future.set_exception(e)
        return future

    def shutdown(self, wait=True, cancel_futures=False):
        pass


class Bench:
    def __init__(self, args):
        self.args = args
        self.started = time.time()
        out = Path(args.out) if args.out else None
        self.results_dir = out or Path(__file__).parent / "results" / "current"
        self.heatmap_dir = (out / "heatmaps") if out else Path(__file__).parent / "heatmaps"
        self.results_dir.mkdir(parents=True, exist_ok=True)
        self.records: list[dict] = []
        self.done: set = set()
        if args.resume:
            self.records = json.loads(Path(args.resume).read_text())
            self.done = {self.key(r) for r in self.records}
        self.screen: dict = {}
        if args.workers > 1:
            ctx = multiprocessing.get_context("spawn")
            self.pool = cf.ProcessPoolExecutor(args.workers, mp_context=ctx, initializer=_setup,
                                               initargs=(args, ctx.Value("i", 0)))
        else:
            self.pool = InlineExecutor(args)
        self.pending: dict = {}

    @staticmethod
    def key(r: dict) -> tuple:
        return r["method"], r.get("granularity"), r.get("sparsity"), r.get("seed")

    def late(self) -> bool:
        return bool(self.args.deadline) and time.time() - self.started > self.args.deadline

    def submit(self, label: str, fn: str, *fn_args, on_done=None):
        if self.late():
            log(f"deadline: not starting {label}")
            return
        self.pending[self.pool.submit(_call, fn, *fn_args)] = (label, on_done)

    def wait(self, predicate=lambda label: True) -> None:
        """Collect finished jobs until none whose label matches the predicate is pending."""
        while any(predicate(label) for label, _ in self.pending.values()):
            remaining = None
            if self.args.deadline:
                remaining = max(1.0, self.args.deadline + 30 - (time.time() - self.started))
            done, _ = cf.wait(self.pending, timeout=remaining, return_when=cf.FIRST_COMPLETED)
            if not done:
                log("deadline: giving up on the jobs still running")
                for label, _ in self.pending.values():
                    log(f"  unfinished: {label}")
                self.pending.clear()
                return
            for fut in done:
                label, on_done = self.pending.pop(fut)
                try:
                    result = fut.result()
                except Exception as e:  # one failed job must not lose the others' records
                    log(f"FAILED {label}: {type(e).__name__}: {e}")
                    continue
                if on_done is not None:
                    on_done(result)
                else:
                    self.add(result)
                log(f"done {label} ({time.time() - self.started:.0f}s)")

    def add(self, records: list[dict]) -> None:
        for r in records:
            self.records.append(r)
            self.done.add(self.key(r))
            if "loss" in r:
                log(f"  {r['method']} {r.get('granularity')} s={r.get('sparsity')} seed={r.get('seed')}: "
                    f"loss {r['loss']:.4f} retrieval {r['retrieval_acc']:.3f}")
        self.save()

    def save(self) -> None:
        (self.results_dir / "quality.json").write_text(json.dumps(self.records, indent=1, default=str))
        if self.screen:
            (self.results_dir / "screen.json").write_text(json.dumps(self.screen, indent=1, default=str))

    def search(self, name, overrides, g, s, seed, heatmaps=False):
        if (f"learned-{name}", g, s, seed) in self.done:
            return
        self.done.add((f"learned-{name}", g, s, seed))
        self.submit(f"search {name} {g} s={s} seed={seed}", "job_search", name, overrides, g, s, seed,
                    str(self.heatmap_dir) if heatmaps else None)

    def learned(self, name, g=None, s=None, seed=None) -> list[dict]:
        return [r for r in self.records if r["method"] == f"learned-{name}" and g in (None, r["granularity"])
                and s in (None, r["sparsity"]) and seed in (None, r.get("seed"))]

    def full(self) -> dict:
        return next(r for r in self.records if r["method"] == "full")

    def run(self) -> None:
        from consa.baselines import baseline_names

        a = self.args
        if ("full", None, 0.0, None) not in self.done:
            self.submit("full attention", "job_full")
        names = [] if a.baselines == "none" else \
            [n for n in (RULES + ("random",) + SCORED) if a.baselines == "all" or n in a.baselines.split(",")]
        scored = [n for n in names if n in SCORED]
        first = a.seeds[0]  # the rules and random run once, with the first seed's job (and heatmaps)
        baseline_seeds = sorted({*a.seeds, *(a.screen_seeds if a.screen else [])})
        for seed in baseline_seeds:
            todo = {}  # (granularity, sparsity) -> the baselines this seed still has to run there
            for g in a.granularities:
                for s in a.sparsities:
                    names_left = [n for n in names if ALIASES.get(n, n) in baseline_names(g)
                                  and (n, g, s, seed if n in SCORED else None) not in self.done
                                  and ((seed in a.seeds or s == a.screen_sparsity) if n in SCORED else seed == first)]
                    if names_left:
                        todo[(g, s)] = names_left
                        self.done.update((n, g, s, seed if n in SCORED else None) for n in names_left)

            def run_baselines(result, seed=seed, todo=todo):
                for (g, s), names_left in todo.items():
                    self.submit(f"baselines {g} s={s} seed={seed}", "job_baselines", g, s, seed, names_left,
                                result["scores"], result["seconds"], str(self.heatmap_dir) if seed == first else None)

            if any(n in SCORED for names_left in todo.values() for n in names_left):
                self.submit(f"scores seed={seed}", "job_scores", seed, a.granularities, scored, on_done=run_baselines)
            elif todo:  # the rules and random need no scores: a resumed run does not compute them again
                run_baselines({"scores": {}, "seconds": {}})

        default = a.variants[0][0] if a.variants else None
        if a.screen:
            default = self.run_screen()
        variants = dict(a.variants)
        if default is not None:  # the default's cells first: the deadline must not cut them
            settings = variants.pop(default, None) or self.screen["variants"][default]["settings"]
            variants = {default: settings, **variants}
        for name, overrides in variants.items():
            for seed in a.seeds:
                for g in a.granularities:
                    for s in a.sparsities:
                        self.search(name, overrides, g, s, seed, heatmaps=seed == first)
        self.wait()
        if a.pick_default:
            default = self.pick_default(variants) or default
        for r in self.records:
            r.pop("default", None)  # a resumed run may have marked another variant
            if default is not None and r["method"] == f"learned-{default}":
                r["default"] = True
        self.save()
        self.finish(default)

    def pick_default(self, variants: dict) -> str | None:
        winner, info = pick_default(self.records, variants)
        if winner is None:
            log("pick-default: no learned records, the default stays")
            return None
        self.screen.update(all_cells=info["scores"], default=winner, left_out=info["left_out"],
                           incumbent=info["incumbent"])
        for name, v in sorted(info["scores"].items(), key=lambda kv: -kv[1]["score"]):
            log(f"all cells {name}: {v['score']:+.4f} ({v['runs']} runs)")
        if info["left_out"]:
            log(f"pick-default: no records of {', '.join(info['left_out'])} (left out)")
        log(f"default: {winner} (incumbent: {info['incumbent']})")
        return winner

    def run_screen(self) -> str:
        """Screen the variants at one sparsity; then combinations of the knobs that beat `lm`. Returns the winner."""
        a = self.args
        s = a.screen_sparsity
        tried = dict(a.screen)

        def launch(variants):
            for name, overrides in variants.items():
                for g in a.granularities:
                    for seed in a.screen_seeds:
                        self.search(name, overrides, g, s, seed, heatmaps=False)
            self.wait(lambda label: label.startswith("search") or label == "full attention")

        def scores() -> dict:
            full = self.full()
            out = {}
            for name, overrides in tried.items():
                runs = self.learned(name, s=s)
                runs = [r for r in runs if r.get("seed") in a.screen_seeds]
                if len(runs) == len(a.granularities) * len(a.screen_seeds):
                    out[name] = {"score": round(screen_score(runs, full), 4), "settings": overrides,
                                 "runs": [(r["granularity"], r["seed"], r["loss"], r["retrieval_acc"]) for r in runs]}
            return out

        launch(tried)
        self.screen = {"sparsity": s, "seeds": a.screen_seeds, "loss_weight": LOSS_WEIGHT, "variants": scores()}
        self.save()
        ranked = sorted(self.screen["variants"].items(), key=lambda kv: -kv[1]["score"])
        for name, v in ranked:
            log(f"screen {name}: {v['score']:+.4f}")
        if not ranked:
            raise SystemExit("the screen produced no complete variant")
        best, best_v = ranked[0]
        base = self.screen["variants"].get("lm", {"score": float("-inf")})["score"]
        # Knobs that helped on their own (beyond the objective), added to the best variant one at a time.
        helpful = [(n, v) for n, v in ranked[1:] if v["score"] > base and set(v["settings"]) - {"objective"}]
        combos = {}
        for n, v in helpful[:a.combine]:
            merged = {**best_v["settings"], **{k: x for k, x in v["settings"].items() if k != "objective"}}
            if merged != best_v["settings"] and merged not in tried.values():
                combos[f"{best}+{n.removeprefix('lm-')}"] = merged
        if combos and not self.late():
            tried.update(combos)
            launch(combos)
            self.screen["variants"] = scores()
            self.save()
        winner = max(self.screen["variants"].items(), key=lambda kv: kv[1]["score"])[0]
        self.screen["winner"] = winner
        log(f"screen winner: {winner} {self.screen['variants'][winner]}")
        self.save()
        return winner

    def finish(self, default) -> None:
        workers = list(getattr(self.pool, "_processes", {}).values())
        self.pool.shutdown(wait=False, cancel_futures=True)
        for process in workers:  # past the deadline some may still be computing: they hold the device
            process.terminate()
        write_reports(self.records, default, self.args, self.results_dir, f"{time.time() - self.started:.0f}s in total")
        if self.args.pack and self.heatmap_dir.exists():
            with tarfile.open(self.results_dir / "heatmaps.tar.gz", "w:gz") as tar:
                for png in sorted(self.heatmap_dir.glob("*.png")):
                    tar.add(png, arcname=f"heatmaps/{png.name}")
                    png.unlink()
            self.heatmap_dir.rmdir()
        log(f"done in {time.time() - self.started:.0f}s: {self.results_dir / 'quality.json'}")


def write_reports(records: list[dict], default: str | None, a, results_dir: Path, note: str) -> None:
    """quality.md (every record, then the per-cell summary) and quality_summary.json."""
    from consa.compare import markdown_table

    ordered = sorted(records, key=lambda r: (str(r.get("granularity")), r.get("sparsity", 0), r["method"],
                                             r.get("seed") or 0))
    header = (f"model `{a.model}`, window {a.window}, context {a.seq_len}, {a.eval_sequences} held-out "
              f"sequences, {a.retrieval_docs} retrieval docs, search {a.steps} steps, retrieval ratio "
              f"{a.retrieval_ratio}, default learned-{default}, {note}\n\n")
    table = markdown_table([{**r, "name": f"{r['method']}" + (f" seed {r['seed']}" if r.get("seed") else "")}
                            for r in ordered])
    summary = summarize(records, default, [(g, s) for g in a.granularities for s in a.sparsities])
    (results_dir / "quality_summary.json").write_text(json.dumps(summary, indent=1))
    (results_dir / "quality.md").write_text(header + table + summary_markdown(summary))
    print(table, flush=True)
    log(f"verdicts of learned-{default}: {verdict_counts(summary)}")


def report_only(args) -> list[dict]:
    """--report-only: the reports (and, with --pick-default, the default) from the --resume records alone."""
    records = json.loads(Path(args.resume).read_text())
    variants = dict(args.variants)
    default = next(iter(variants), None)
    screen = {}
    if args.pick_default:
        default, info = pick_default(records, variants)
        screen = {"all_cells": info.get("scores"), "default": default, "left_out": info.get("left_out"),
                  "incumbent": info.get("incumbent")}
    for r in records:
        r.pop("default", None)
        if default is not None and r["method"] == f"learned-{default}":
            r["default"] = True
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / "current"
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(records, indent=1, default=str))
    if screen:
        (out / "screen.json").write_text(json.dumps(screen, indent=1, default=str))
    write_reports(records, default, args, out, f"reports rewritten from {Path(args.resume).name}")
    return records


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.report_only:
        return report_only(args)
    bench = Bench(args)
    bench.run()
    return bench.records


if __name__ == "__main__":
    main()
    os._exit(0)  # workers still computing past the deadline must not hold the run open
