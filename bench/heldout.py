"""Re-evaluate the allocations of a quality run on text and retrieval prompts the run never saw.

bench/quality.py ranks methods on one held-out set (the Python standard library, 4-key retrieval
documents); this takes the allocations it recorded (each record's `pattern`) and evaluates them again
on another corpus and another retrieval setting, so a ranking that holds only on that one table shows.
It runs on the CPU (float32 weights) as well as on a GPU.

    python bench/heldout.py --records bench/results/current/quality.json --model .models/qwen3-code-26m \\
        --eval-data /usr/lib/python3/dist-packages --keys 8 --seed 7 --cells kv_head:0.5,kv_head:0.75 \\
        --methods learned-lm,learned-distill,heuristic-loss,duo,retrieval-heads --out bench/results/current
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402


def allocation_of(record: dict, window: int):
    """The allocation a quality record evaluated, rebuilt from its pattern (F = full, . = SWA per KV head)."""
    from consa.core.manifest import Allocation

    full = torch.tensor([[c == "F" for c in row] for row in record["pattern"]])
    return Allocation.from_full_mask(full, model="heldout", granularity=record["granularity"], window=window,
                                     sink_tokens=0, sparsity_target=float(record["sparsity"]), method=record["method"])


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", required=True, help="a quality.json")
    p.add_argument("--model", default=".models/qwen3-code-26m")
    p.add_argument("--eval-data", required=True, help="held-out text none of the methods saw")
    p.add_argument("--keys", type=int, default=8, help="key lines per retrieval document")
    p.add_argument("--seed", type=int, default=7, help="seed of the rows and the retrieval documents")
    p.add_argument("--sequences", type=int, default=16)
    p.add_argument("--docs", type=int, default=100)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--cells", default="kv_head:0.5", help="granularity:sparsity, comma-separated")
    p.add_argument("--methods", default="learned-lm,heuristic-loss")
    p.add_argument("--seeds", default="0", help="the records' seeds to re-evaluate")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None)
    p.add_argument("--name", default="heldout.json", help="output file name in --out")
    args = p.parse_args(argv)

    from consa.core.config import SearchConfig
    from consa.evaluation.metrics import build_eval_set, evaluate
    from consa.model.sharding import load_for_search

    cells = [(g, float(s)) for g, s in (c.split(":") for c in args.cells.split(","))]
    methods, seeds = args.methods.split(","), [int(s) for s in args.seeds.split(",")]
    wanted = [r for r in json.loads(Path(args.records).read_text())
              if r["method"] in methods and (r.get("granularity"), r.get("sparsity")) in cells
              and r.get("seed", 0) in seeds and r.get("pattern")]
    model, tokenizer = load_for_search(SearchConfig(model=args.model, sparsity=0.5), args.device)
    model.eval()
    eval_set = build_eval_set(tokenizer, args.eval_data, seq_len=args.seq_len, num_sequences=args.sequences,
                              retrieval_docs=args.docs, seed=args.seed, num_keys=args.keys)
    setting = {"eval_data": args.eval_data, "keys": args.keys, "eval_seed": args.seed, "sequences": int(eval_set.rows.shape[0]),
               "docs": args.docs, "seq_len": args.seq_len, "device": str(next(model.parameters()).device)}
    records = []
    for record in [None, *wanted]:
        t = time.time()
        allocation = None if record is None else allocation_of(record, args.window)
        result = evaluate(model, tokenizer, allocation, data=eval_set, window=args.window, batch_size=4)
        out = {"method": "full"} if record is None else {k: record.get(k) for k in ("method", "granularity", "sparsity", "seed")}
        out |= {"loss": result["loss"], "retrieval_acc": result["retrieval_acc"], "quality_loss": record and record["loss"],
                "quality_retrieval": record and record["retrieval_acc"], **setting}
        records.append(out)
        print(f"{out['method']} {out.get('granularity')} {out.get('sparsity')} seed {out.get('seed')}: loss "
              f"{out['loss']:.4f} retrieval {out['retrieval_acc']:.3f} ({time.time() - t:.0f}s)", flush=True)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / args.name).write_text(json.dumps(records, indent=1))
    return records


if __name__ == "__main__":
    main()
