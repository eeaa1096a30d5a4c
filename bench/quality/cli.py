"""The quality benchmark's command line: `python bench/quality.py ...` (or `python -m bench.quality ...`)."""

import argparse
import json
from pathlib import Path

from bench.corpora import TRAIN_TEXT, check_held_out, held_out_text

from .report import write_reports
from .runner import RESULTS_DIR, Bench
from .variants import BASELINES, VARIANTS, parse_variant, pick_default

DESCRIPTION = "Quality benchmark: learned allocations vs every baseline vs full attention, on one model."


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=DESCRIPTION)
    p.add_argument("--model", default=".models/qwen3-code-26m", help="local model directory")
    p.add_argument("--eval-data", default=None, help="held-out text (default: Python stdlib, without site-packages)")
    p.add_argument("--train-data", default=TRAIN_TEXT, help="search text (default: site-packages)")
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
    args.eval_data = args.eval_data or held_out_text()
    check_held_out(args.eval_data, args.train_data)
    args.sparsities = [float(s) for s in args.sparsities.split(",")]
    if args.methods is not None:
        methods = args.methods.split(",")
        known = {"full", *(f"learned-{v}" for v in VARIANTS), *BASELINES}
        unknown = [m for m in methods if m not in known]
        if unknown:
            p.error(f"unknown method(s): {', '.join(unknown)}")
        args.variants = ",".join(m.removeprefix("learned-") for m in methods if m.startswith("learned-"))
        args.baselines = ",".join(m for m in methods if m in BASELINES) or "none"
    args.granularities = args.granularities.split(",")
    args.variants = [parse_variant(v) for v in args.variants.split(",") if v]
    args.screen = [parse_variant(v) for v in args.screen.split(",") if v]
    args.screen_seeds = [int(s) for s in args.screen_seeds.split(",")]
    args.seeds = [int(s) for s in args.seeds.split(",")]
    if args.report_only and not args.resume:
        raise SystemExit("--report-only rewrites the reports of a finished run: name its quality.json with --resume")
    return args


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
    out = Path(args.out) if args.out else RESULTS_DIR
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
