"""What the quality benchmark prints and writes: the per-cell summary with the default's verdicts, and
quality.md / quality_summary.json."""

import json
import math
import statistics
import time
from pathlib import Path

METRICS = {"loss": -1, "retrieval_acc": 1}  # the summary's metrics: -1 = lower is better


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


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
    # met only where compared: a cell with nothing to beat proves nothing
    compared = {(v["granularity"], v["sparsity"]) for v in verdicts}
    met = (default is not None and all(cell in mine and cell in compared for cell in grid)
           and all(v["verdict"] != "loss" for v in verdicts))
    return {"default": f"learned-{default}" if default else None, "cells": cells, "verdicts": verdicts,
            "all_cells_met": met}


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


def write_reports(records: list[dict], default: str | None, a, results_dir: Path, note: str) -> None:
    """quality.md (every record, then the per-cell summary) and quality_summary.json."""
    from consa.evaluation.compare import markdown_table

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
