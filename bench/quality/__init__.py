"""Quality benchmark: learned allocations vs every baseline vs full attention, on one model.

For each granularity x sparsity: learned allocations (consa.recipe.pipeline.run_allocation, one per search
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

The code: variants.py (the search variants, the baselines, the rule that picks the default), runner.py
(the worker processes, their jobs, the orchestration), report.py (the per-cell summary, the verdicts,
quality.md), cli.py (the arguments, --report-only). bench/quality.py is the command.
"""

from .cli import main, parse_args, report_only
from .report import METRICS, log, summarize, summary_markdown, verdict_counts, write_reports
from .runner import (HEATMAP_DIR, RECORD_KEYS, RESULTS_DIR, Bench, InlineExecutor, load_worker, mean_record, pattern,
                     record_of)
from .variants import ALIASES, BASELINES, LOSS_WEIGHT, SCORED, VARIANTS, parse_variant, pick_default, screen_score

__all__ = [
    "VARIANTS", "BASELINES", "SCORED", "ALIASES", "LOSS_WEIGHT", "parse_variant", "screen_score", "pick_default",
    "METRICS", "log", "summarize", "verdict_counts", "summary_markdown", "write_reports",
    "RECORD_KEYS", "RESULTS_DIR", "HEATMAP_DIR", "pattern", "record_of", "mean_record", "load_worker", "Bench",
    "InlineExecutor", "parse_args", "report_only", "main",
]
