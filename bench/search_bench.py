"""Issue-2 benchmark: the search on the testbed model (GPU).

For each configuration: the trace of s_hat vs the ramped target, the exact final sparsity, time per
step, and the held-out loss (Python stdlib) of the learned allocation vs full attention, plus the two
rules the testbed card quotes (interleave 1:1, bottom-half SWA) as a sanity anchor.

    python bench/search_bench.py --model .models/qwen3-code-26m --out $OUT
"""

import argparse
import json
import os
import site
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from consa import data  # noqa: E402
from consa.hybrid_attention import apply_allocation, install  # noqa: E402
from consa.manifest import Allocation  # noqa: E402
from consa.search import SearchConfig, load_model, run_search  # noqa: E402


def held_out_loss(model, hybrid, rows, batch=8):
    """Mean next-token loss over rows (N, T) under the hybrid's current (hard) gates."""
    total, count = 0.0, 0
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=rows.is_cuda):
        for i in range(0, rows.shape[0], batch):
            x = rows[i:i + batch]
            logits = model(input_ids=x).logits.float()  # (B, T, V)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="sum")
            total += loss.item()
            count += x[:, 1:].numel()
    return total / count


def rule(layers, heads, swa_layers, window):
    full = torch.ones(layers, heads, dtype=torch.bool)
    full[list(swa_layers)] = False
    return Allocation.from_full_mask(full, model="testbed", granularity="layer", window=window, method="rule")


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--train-data", default=None, help="default: this Python's site-packages")
    p.add_argument("--heldout", default=os.path.dirname(os.__file__))
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--eval-sequences", type=int, default=32)
    p.add_argument("--configs", default="kv_head:0.5:lm:0.125,layer:0.5:lm:0.125",
                   help="comma list of granularity:sparsity:objective:retrieval_ratio")
    p.add_argument("--budget-s", type=float, default=420, help="skip remaining configs past this wall time")
    args = p.parse_args(argv)
    started = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_dir = args.train_data or site.getsitepackages()[0]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}", flush=True)

    model, tokenizer = load_model(args.model, device=device)
    heldout = data.pack_tokens(tokenizer, data.iter_texts(args.heldout, suffixes={".py"}), args.seq_len,
                               max_sequences=args.eval_sequences).to(device)
    hybrid = install(model, args.window)
    layers, heads = hybrid.num_layers, hybrid.num_kv_heads
    records = {"machine": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "train_data": train_dir, "heldout": args.heldout,
               "seq_len": args.seq_len, "window": args.window, "eval_sequences": heldout.shape[0], "runs": []}
    hybrid.set_gates(None)
    records["full_loss"] = held_out_loss(model, hybrid, heldout)
    for name, swa_layers in (("interleave_1to1", range(0, layers, 2)), ("bottom_half_swa", range(layers // 2)),
                             ("all_swa", range(layers))):
        apply_allocation(model, rule(layers, heads, swa_layers, args.window))
        records[f"{name}_loss"] = held_out_loss(model, model.consa_hybrid, heldout)
    print(json.dumps({k: v for k, v in records.items() if k.endswith("loss")}), flush=True)

    train_rows = None
    for spec in args.configs.split(","):
        if time.time() - started > args.budget_s:
            print(f"budget reached, skipping {spec}", flush=True)
            continue
        granularity, sparsity, objective, ratio = spec.split(":")
        config = SearchConfig(model=args.model, sparsity=float(sparsity), granularity=granularity, window=args.window,
                              seq_len=args.seq_len, batch_size=args.batch_size, steps=args.steps, objective=objective,
                              retrieval_ratio=float(ratio), data=train_dir)
        rows = data.build_dataset(tokenizer, train_dir, args.seq_len, args.steps * args.batch_size,
                                  retrieval_ratio=float(ratio), seed=0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.time()
        result = run_search(config, model=model, tokenizer=tokenizer, dataset=rows, log_every=10)
        seconds = time.time() - t0
        alloc = result.allocation
        apply_allocation(model, alloc)
        loss = held_out_loss(model, model.consa_hybrid, heldout)
        run = {"config": spec, "sparsity_achieved": alloc.sparsity_achieved, "seconds": round(seconds, 1),
               "s_per_step": round(seconds / args.steps, 4), "heldout_loss": loss,
               "loss_vs_full_pct": round(100 * (loss / records["full_loss"] - 1), 2),
               "trace": [(r["step"], r["target"], r["sparsity"], r["loss"]) for r in result.history],
               "assignment": ["".join("F" if v == "full" else "." for v in row) for row in alloc.assignment]}
        records["runs"].append(run)
        alloc.save(out / f"manifest_{granularity}_{sparsity}_{objective}_{ratio}.json")
        print(json.dumps({k: v for k, v in run.items() if k != "trace"}), flush=True)
        (out / "search_bench.json").write_text(json.dumps(records, indent=1))
        del train_rows
        train_rows = rows
    (out / "search_bench.json").write_text(json.dumps(records, indent=1))
    print(f"done in {time.time() - started:.0f}s", flush=True)


if __name__ == "__main__":
    main()
