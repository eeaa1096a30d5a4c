"""Quality benchmark: learned allocations vs every baseline vs full attention, on one model.

For each granularity x sparsity: run the search (objectives lm and distill), build every baseline at
the same exact sparsity (random: several seeds, reported as mean ± std), and evaluate all of them on
the same held-out rows and retrieval prompts. Writes quality.json (a list of records), quality.md (the
table) and heatmap PNGs.

    python bench/quality.py --model .models/qwen3-code-26m --out $OUT --pack

Defaults are the testbed setting: window 256, 4k context, held-out text = this machine's Python
standard library, training text = this machine's site-packages (a different directory).
"""

import argparse
import json
import os
import statistics
import sys
import sysconfig
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from consa import data as data_mod  # noqa: E402
from consa.baselines import baseline_names, build_baseline, heuristic_loss_scores  # noqa: E402
from consa.compare import markdown_table  # noqa: E402
from consa.evaluation import build_eval_set, evaluate  # noqa: E402
from consa.heatmap import save_heatmap  # noqa: E402
from consa.hybrid_attention import model_shape  # noqa: E402
from consa.config import SearchConfig  # noqa: E402
from consa.loading import load_model, pick_device  # noqa: E402
from consa.search import run_search  # noqa: E402

LEARNED = ("learned-lm", "learned-distill")
ALL_METHODS = ("full", *LEARNED, *baseline_names())
# Kept small on purpose: the random mean over seeds, and the per-unit detail, go in as extra fields.
RECORD_KEYS = ("loss", "loss_pos_lt_window", "loss_pos_ge_window", "loss_pos_ge_1024", "retrieval_acc",
               "needle_grid", "kv_bytes", "kv_bytes_ratio")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=".models/qwen3-code-26m", help="local model directory")
    p.add_argument("--eval-data", default=os.path.dirname(os.__file__), help="held-out text (default: Python stdlib)")
    p.add_argument("--train-data", default=sysconfig.get_paths()["purelib"], help="search text (default: site-packages)")
    p.add_argument("--out", default=None, help="output directory (default: bench/results + bench/heatmaps)")
    p.add_argument("--pack", action="store_true", help="pack heatmaps into heatmaps.tar.gz (few files for $OUT)")
    p.add_argument("--sparsities", default="0.25,0.5,0.75")
    p.add_argument("--granularities", default="layer,kv_head")
    p.add_argument("--methods", default=",".join(ALL_METHODS), help=f"subset of {','.join(ALL_METHODS)}")
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=4096, help="evaluation context length")
    p.add_argument("--eval-sequences", type=int, default=32)
    p.add_argument("--retrieval-docs", type=int, default=200)
    p.add_argument("--eval-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=300, help="search steps per learned allocation")
    p.add_argument("--search-seq-len", type=int, default=4096)
    p.add_argument("--search-batch", type=int, default=1)
    p.add_argument("--retrieval-ratio", type=float, default=0.25, help="share of retrieval docs in search data")
    p.add_argument("--search-lr", type=float, default=None, help="gate lr (default: SearchConfig's)")
    p.add_argument("--calibration-sequences", type=int, default=8, help="rows scored by heuristic-loss")
    p.add_argument("--random-seeds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    args.sparsities = [float(s) for s in args.sparsities.split(",")]
    args.granularities = args.granularities.split(",")
    args.methods = args.methods.split(",")
    unknown = set(args.methods) - set(ALL_METHODS)
    if unknown:
        p.error(f"unknown method(s): {', '.join(sorted(unknown))}")
    return args


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


def mean_record(method, granularity, sparsity, runs: list[dict]) -> dict:
    """Mean ± std over seeded runs of one baseline."""
    rec = {"method": method, "granularity": granularity, "sparsity": sparsity}
    for key in ("loss", "loss_pos_ge_window", "retrieval_acc", "kv_bytes_ratio"):
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            rec[key] = statistics.fmean(values)
            rec[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    rec["runs"] = runs
    return rec


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    started = time.time()
    out = Path(args.out) if args.out else None
    results_dir = out or Path(__file__).parent / "results"
    heatmap_dir = (out / "heatmaps") if out else Path(__file__).parent / "heatmaps"
    results_dir.mkdir(parents=True, exist_ok=True)

    # setup: one model, one eval set, one training set shared by every search
    device = pick_device(args.device)
    model, tokenizer = load_model(args.model, device=device)
    shape = model_shape(model)
    log(f"model {args.model}: {shape[0]} layers x {shape[1]} KV heads on {device}")
    eval_set = build_eval_set(tokenizer, args.eval_data, seq_len=args.seq_len, num_sequences=args.eval_sequences,
                              retrieval_docs=args.retrieval_docs, seed=args.seed)
    log(f"eval set: {tuple(eval_set.rows.shape)} rows, {len(eval_set.docs)} retrieval docs from {args.eval_data}")
    train_rows = None
    if set(args.methods) & {*LEARNED, "heuristic-loss"}:
        n_train = max(args.steps * args.search_batch, args.calibration_sequences)
        train_rows, train_labels = data_mod.build_dataset(tokenizer, args.train_data, args.search_seq_len, n_train,
                                                          retrieval_ratio=args.retrieval_ratio, seed=args.seed,
                                                          with_labels=True)
        log(f"search data: {tuple(train_rows.shape)} rows from {args.train_data} (retrieval ratio {args.retrieval_ratio})")

    def run_eval(allocation):
        return evaluate(model, tokenizer, allocation, data=eval_set, window=args.window, batch_size=args.eval_batch)

    def heatmap(allocation, g, s, name):
        return str(save_heatmap(allocation, heatmap_dir / f"{g}_s{s:g}_{name.replace(':', 'to')}.png"))

    records = []
    if "full" in args.methods:
        result = run_eval(None)
        records.append(record_of("full", None, 0.0, result))
        log(f"full: loss {result['loss']:.4f} retrieval {result['retrieval_acc']:.3f}")

    for g in args.granularities:
        scores = None
        if "heuristic-loss" in args.methods:
            t = time.time()
            text_rows = train_rows[(train_rows == train_labels).all(1)]  # calibrate on text, as a user would
            scores = heuristic_loss_scores(model, text_rows[:args.calibration_sequences], g, args.window,
                                           batch_size=args.eval_batch)
            log(f"heuristic-loss scores ({g}) in {time.time() - t:.1f}s")
        for s in args.sparsities:
            allocations = {}  # name -> (allocation, extra fields)
            for method in LEARNED:
                if method not in args.methods:
                    continue
                cfg = dict(model=args.model, sparsity=s, granularity=g, window=args.window, seq_len=args.search_seq_len,
                           batch_size=args.search_batch, steps=args.steps, objective=method.split("-")[1],
                           retrieval_ratio=args.retrieval_ratio, seed=args.seed)
                if args.search_lr is not None:
                    cfg["lr"] = args.search_lr
                t = time.time()
                result = run_search(SearchConfig(**cfg), model=model, tokenizer=tokenizer,
                                    dataset=(train_rows, train_labels),
                                    log_every=1,
                                    progress=lambda r: r["step"] % max(1, args.steps // 4) == 0 and log(
                                        f"  {method} {g} s={s}: step {r['step']} loss {r['loss']:.4f} "
                                        f"ŝ {r['sparsity']:.3f} target {r['target']:.3f}"))
                trace = [(r["step"], r["target"], r["sparsity"], r["loss"]) for r in result.history]
                allocations[method] = (result.allocation, {"search_seconds": round(time.time() - t, 1),
                                                           "s_per_step": round((time.time() - t) / args.steps, 4),
                                                           "trace": trace[::max(1, len(trace) // 30)] + trace[-1:]})
            for name in baseline_names(g):
                if name in args.methods and name != "random":
                    allocations[name] = (build_baseline(name, shape, s, g, args.window, scores=scores), {})

            for name, (allocation, extra) in allocations.items():
                result = run_eval(allocation)
                records.append(record_of(name, g, s, result, allocation, heatmap=heatmap(allocation, g, s, name), **extra))
                log(f"{g} s={s} {name}: loss {result['loss']:.4f} retrieval {result['retrieval_acc']:.3f} "
                    f"({result['seconds']:.1f}s)")
            if "random" in args.methods:
                runs = []
                for seed in range(args.random_seeds):
                    allocation = build_baseline("random", shape, s, g, args.window, seed=seed)
                    runs.append(record_of("random", g, s, run_eval(allocation), allocation, seed=seed))
                records.append(mean_record("random", g, s, runs))
                log(f"{g} s={s} random: loss {records[-1]['loss']:.4f} ± {records[-1]['loss_std']:.4f} "
                    f"retrieval {records[-1]['retrieval_acc']:.3f}")
            (results_dir / "quality.json").write_text(json.dumps(records, indent=1))  # partial, in case of a timeout

    # save: records, the table, the heatmaps
    (results_dir / "quality.json").write_text(json.dumps(records, indent=1))
    table = markdown_table(records)
    header = (f"model `{args.model}`, window {args.window}, context {args.seq_len}, {args.eval_sequences} held-out "
              f"sequences, {args.retrieval_docs} retrieval docs, search {args.steps} steps, "
              f"retrieval ratio {args.retrieval_ratio}, {time.time() - started:.0f}s in total\n\n")
    (results_dir / "quality.md").write_text(header + table)
    if args.pack and heatmap_dir.exists():
        with tarfile.open(results_dir / "heatmaps.tar.gz", "w:gz") as tar:
            for png in sorted(heatmap_dir.glob("*.png")):
                tar.add(png, arcname=f"heatmaps/{png.name}")
                png.unlink()
        heatmap_dir.rmdir()
    print(table, flush=True)
    log(f"done in {time.time() - started:.0f}s: {results_dir / 'quality.json'}")
    return records


if __name__ == "__main__":
    main()
