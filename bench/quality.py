"""Quality benchmark: learned allocations vs every baseline vs full attention, on one model.

The command; the code is the package bench/quality/ (its docstring says what the benchmark does):

    python bench/quality.py --model .models/qwen3-code-26m --out $OUT --pack --workers 6 \\
        --screen lm,distill,lm+distill,lm-warm,lm-anneal,lm-ret50,lm-keys8,lm-refine
    python bench/quality.py ... --variants lm,distill --seeds 0,1,2 --pick-default  # every cell, 3 seeds
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench.quality import *  # noqa: E402,F403  the package's names (VARIANTS, summarize, ...), as tests use them
from bench.quality import main  # noqa: E402

if __name__ == "__main__":
    main()
    os._exit(0)  # workers still computing past the deadline must not hold the run open
