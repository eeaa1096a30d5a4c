"""Every layer allocation of a cell, evaluated: the loss / retrieval Pareto front, and where each
method's allocation sits on it.

With 12 layers a cell has C(12, n) allocations (220 at s = 0.25 or 0.75), few enough to evaluate
them all on the quality benchmark's own eval set (bench/quality.py: the stdlib rows and the 4-key
retrieval documents, seed 0). That answers two questions no comparison of methods can:
- does an allocation exist that is at least as good as every method on both metrics at once?
- is a learned allocation the best one *for the search's own objective* (then what separates it from
  the best eval loss is the objective), or not (then it is the optimiser)? For that every allocation
  is also scored by the lm objective (per-row mean next-token loss, as consa.search.objectives computes it)
  on held-out search data: text rows and 4-key retrieval rows of another seed.
Per-row losses and per-document hits are kept, so any two allocations can be compared paired, with
the evaluation's own sampling noise.

    python bench/pareto.py --cells layer:0.25,layer:0.75 --records bench/results/current/quality.json \\
        --train-data /tmp/sp --workers 8 --out $OUT
    python bench/pareto.py --summarize-only bench/results/current/pareto.json --records bench/results/current/quality.json \\
        --out bench/results/current  # place newer records on the same allocations, evaluating nothing
"""

import argparse
import itertools
import json
import multiprocessing
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench.corpora import TRAIN_TEXT, check_held_out, held_out_text  # noqa: E402

_state: dict = {}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=".models/qwen3-code-26m")
    p.add_argument("--eval-data", default=None, help="bench/quality.py's held-out text (default: its own)")
    p.add_argument("--train-data", default=TRAIN_TEXT, help="search text (for the objective)")
    p.add_argument("--cells", default="layer:0.25,layer:0.75", help="layer:sparsity, comma-separated")
    p.add_argument("--records", default=None, help="a quality.json: its methods are placed on the front")
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--eval-sequences", type=int, default=32)
    p.add_argument("--retrieval-docs", type=int, default=200)
    p.add_argument("--objective-rows", type=int, default=48, help="held-out search rows (25%% retrieval)")
    p.add_argument("--objective-seed", type=int, default=100, help="a seed no search of the benchmark used")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--deadline", type=float, default=0, help="seconds: stop evaluating after this (0 = none)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="bench/results/current")
    p.add_argument("--name", default="pareto.json")
    p.add_argument("--summarize-only", default=None, metavar="PARETO_JSON",
                   help="evaluate nothing: place the --records methods on the allocations of this earlier output")
    args = p.parse_args(argv)
    args.eval_data = args.eval_data or held_out_text()
    check_held_out(args.eval_data, args.train_data)
    args.cells = [(g, float(s)) for g, s in (c.split(":") for c in args.cells.split(","))]
    if any(g != "layer" for g, _ in args.cells):
        p.error("only layer cells can be enumerated (kv_head cells have C(48, n) allocations)")
    return args


def _setup(args, counter) -> None:
    from bench.quality import load_worker
    from consa.core import data as data_mod

    model, tokenizer, eval_set = load_worker(args, counter)  # the quality benchmark's own eval set
    model.eval()
    rows, labels = data_mod.build_dataset(tokenizer, args.train_data, args.seq_len, args.objective_rows,
                                          retrieval_ratio=0.25, seed=args.objective_seed, num_keys=4,
                                          with_labels=True)
    _state.update(args=args, model=model, tokenizer=tokenizer, eval_set=eval_set, rows=rows, labels=labels)


def evaluate_layers(swa_layers: tuple) -> dict:
    """One allocation (these layers SWA, the rest full): eval loss per row, hit per document, and the
    lm objective on the held-out search rows, text and retrieval rows apart."""
    import torch

    from consa.core import data as data_mod
    from consa.evaluation.metrics import retrieval_correct, token_losses
    from consa.model.hybrid_attention import apply_allocation, model_shape
    from consa.core.manifest import Allocation
    from consa.search.objectives import row_means

    a, model = _state["args"], _state["model"]
    num_layers, num_kv_heads = model_shape(model)
    full = torch.ones(num_layers, num_kv_heads, dtype=torch.bool)
    full[list(swa_layers)] = False
    allocation = Allocation.from_full_mask(full, model="pareto", granularity="layer", window=a.window,
                                           sink_tokens=0, sparsity_target=len(swa_layers) / num_layers)
    hybrid = apply_allocation(model, allocation)
    try:
        row_loss = token_losses(model, _state["eval_set"].rows, a.batch).mean(1)  # (N,)
        hits = retrieval_correct(model, _state["tokenizer"], _state["eval_set"].docs, a.batch)
        nll = token_losses(model, _state["rows"], a.batch)  # (R, T-1)
    finally:
        hybrid.set_gates(None)
    per_row = row_means(nll, _state["labels"])  # what the lm objective averages
    retrieval_row = (_state["labels"] == data_mod.IGNORE).any(1)
    return {"swa": list(swa_layers), "loss": row_loss.mean().item(), "retrieval_acc": sum(hits) / len(hits),
            "row_loss": [round(x, 5) for x in row_loss.tolist()], "hits": "".join("1" if h else "0" for h in hits),
            "objective": per_row.mean().item(), "objective_text": per_row[~retrieval_row].mean().item(),
            "objective_retrieval": per_row[retrieval_row].mean().item()}


def dominates(x: dict, y: dict) -> bool:
    """x at least as good as y on both metrics and better on one (lower loss, higher retrieval)."""
    return x["loss"] <= y["loss"] and x["retrieval_acc"] >= y["retrieval_acc"] and \
        (x["loss"] < y["loss"] or x["retrieval_acc"] > y["retrieval_acc"])


def pareto_front(entries: list[dict]) -> list[dict]:
    return sorted((e for e in entries if not any(dominates(o, e) for o in entries)), key=lambda e: e["loss"])


def paired(x: dict, y: dict) -> dict:
    """x - y on loss (over the eval rows) and retrieval (over the documents): mean and two standard
    errors of the paired difference, the evaluation's own sampling noise."""
    import statistics

    def diff(a, b):
        d = [u - v for u, v in zip(a, b)]
        return statistics.fmean(d), 2 * statistics.stdev(d) / len(d) ** 0.5

    loss, loss_2se = diff(x["row_loss"], y["row_loss"])
    hits, hits_2se = diff([int(c) for c in x["hits"]], [int(c) for c in y["hits"]])
    return {"loss": loss, "loss_2se": loss_2se, "retrieval": hits, "retrieval_2se": hits_2se}


def place_methods(entries: list[dict], records: list[dict], granularity: str, sparsity: float) -> list[dict]:
    """Each (method, seed) record of the cell: its allocation's entry, how many allocations dominate it,
    and its rank by eval loss, by retrieval and by the search objective (1 = best)."""
    by_swa = {tuple(e["swa"]): e for e in entries}
    order = {"loss": 1, "retrieval_acc": -1, "objective": 1}  # 1 = lower is better
    rank = {key: {tuple(e["swa"]): i + 1 for i, e in enumerate(sorted(entries, key=lambda e: sign * e[key]))}
            for key, sign in order.items()}
    placed = []
    for r in records:
        if r.get("granularity") != granularity or r.get("sparsity") != sparsity or not r.get("pattern"):
            continue
        swa = tuple(i for i, row in enumerate(r["pattern"]) if row[0] == ".")
        e = by_swa.get(swa)
        if e is None:
            continue
        placed.append({"method": r["method"], "seed": r.get("seed"), "swa": list(swa), "loss": e["loss"],
                       "retrieval_acc": e["retrieval_acc"], "objective": e["objective"],
                       "dominated_by": sum(dominates(o, e) for o in entries),
                       "rank_loss": rank["loss"][swa], "rank_retrieval": rank["retrieval_acc"][swa],
                       "rank_objective": rank["objective"][swa]})
    return placed


def summarize(entries: list[dict], records: list[dict], granularity: str, sparsity: float) -> dict:
    placed = place_methods(entries, records, granularity, sparsity)
    front = pareto_front(entries)
    summary = {"granularity": granularity, "sparsity": sparsity, "allocations": len(entries),
               "front": [{k: e[k] for k in ("swa", "loss", "retrieval_acc", "objective")} for e in front],
               "methods": placed}
    if placed:
        best_loss = min(p["loss"] for p in placed)
        best_retrieval = max(p["retrieval_acc"] for p in placed)
        summary["best_of_methods"] = {"loss": best_loss, "retrieval_acc": best_retrieval}
        summary["allocations_at_least_as_good_as_every_method"] = [
            e["swa"] for e in entries if e["loss"] <= best_loss and e["retrieval_acc"] >= best_retrieval]
    best = min(entries, key=lambda e: e["objective"])
    summary["objective_best"] = {k: best[k] for k in ("swa", "loss", "retrieval_acc", "objective")}
    return summary


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.summarize_only:
        earlier = json.loads(Path(args.summarize_only).read_text())
        done = {(c["granularity"], c["sparsity"]): c["entries"] for c in earlier["cells"]}
        return save(args, done, Path(args.out), earlier["setting"])
    num_layers = json.loads((Path(args.model) / "config.json").read_text())["num_hidden_layers"]
    todo = [(g, s, combo) for g, s in args.cells
            for combo in itertools.combinations(range(num_layers), int(round(s * num_layers)))]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started, done = time.time(), {}
    ctx = multiprocessing.get_context("spawn")
    counter = ctx.Value("i", 0)
    print(f"{len(todo)} allocations over {len(args.cells)} cells, {args.workers} workers", flush=True)
    with ctx.Pool(args.workers, initializer=_setup, initargs=(args, counter)) as pool:
        results = pool.imap_unordered(_job, todo, chunksize=1)
        for i, (g, s, entry) in enumerate(results):
            done.setdefault((g, s), []).append(entry)
            if (i + 1) % 20 == 0 or i + 1 == len(todo):
                print(f"{i + 1}/{len(todo)} in {time.time() - started:.0f}s", flush=True)
                save(args, done, out)
            if args.deadline and time.time() - started > args.deadline:
                print(f"deadline: {i + 1} of {len(todo)} evaluated", flush=True)
                pool.terminate()
                break
    return save(args, done, out)


def _job(item):
    g, s, combo = item
    return g, s, evaluate_layers(combo)


def save(args, done: dict, out: Path, setting: dict | None = None) -> dict:
    records = json.loads(Path(args.records).read_text()) if args.records else []
    setting = setting or {k: getattr(args, k) for k in ("eval_sequences", "retrieval_docs", "seq_len", "window",
                                                        "objective_rows", "objective_seed")}
    report = {"setting": setting,
              "cells": [{**summarize(entries, records, g, s), "entries": entries}
                        for (g, s), entries in sorted(done.items())]}
    (out / args.name).write_text(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
