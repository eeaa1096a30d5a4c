"""The `consa` command line: search, eval, compare, export, and (with the service extra) serve, keys, jobs."""

import argparse
import json
import sys
from pathlib import Path

from consa.errors import Cancelled, ConsaError


def _add_model_args(p):
    p.add_argument("--model", required=True, help="local model directory (or a hub id where online)")
    p.add_argument("--revision", default=None)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")


def _add_search_parser(sub):
    p = sub.add_parser("search", help="learn an FA/SWA allocation for a model")
    _add_model_args(p)
    p.add_argument("--sparsity", type=float, required=True, help="share of units that become SWA, in [0, 1]")
    p.add_argument("--granularity", default="kv_head", help="layer | kv_head")
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--sink-tokens", type=int, default=0)
    p.add_argument("--data", required=True, help="text file, directory of text files, or .jsonl with a `text` field")
    p.add_argument("--retrieval-ratio", type=float, default=0.0, help="share of synthetic multi-key retrieval rows")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--lambda-lr", type=float, default=None)
    p.add_argument("--warmup-frac", type=float, default=None)
    p.add_argument("--objective", default="lm", help="lm | distill")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="auto", help="auto | sdpa | flex | flash")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--resume", default=None, help="gates.safetensors of an earlier run to continue from")
    p.add_argument("--out", required=True, help="output directory for manifest.json and gates.safetensors")


def _add_eval_parser(sub):
    p = sub.add_parser("eval", help="evaluate a model under an allocation (hard gates); prints JSON")
    _add_model_args(p)
    p.add_argument("--allocation", default=None, help="manifest.json (omit for the unmodified model)")
    p.add_argument("--data", required=True)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--num-sequences", type=int, default=16)
    p.add_argument("--retrieval-docs", type=int, default=0, help="multi-key retrieval documents to score")
    p.add_argument("--seed", type=int, default=0)


def cmd_search(args) -> int:
    from tqdm import tqdm

    from consa.search import SearchConfig, run_search

    overrides = {k: getattr(args, k) for k in ("lr", "lambda_lr", "warmup_frac") if getattr(args, k) is not None}
    config = SearchConfig(
        model=args.model, revision=args.revision, sparsity=args.sparsity, granularity=args.granularity,
        window=args.window, sink_tokens=args.sink_tokens, data=args.data, retrieval_ratio=args.retrieval_ratio,
        seq_len=args.seq_len, batch_size=args.batch_size, steps=args.steps, objective=args.objective,
        seed=args.seed, device=args.device, backend=args.backend,
        gradient_checkpointing=args.gradient_checkpointing, **overrides)
    bar = tqdm(total=config.steps, desc="search", unit="step", file=sys.stderr)

    def progress(rec):
        bar.n = rec["step"]
        bar.set_postfix(loss=f"{rec['loss']:.4f}", s=f"{rec['sparsity']:.3f}", t=f"{rec['target']:.3f}")

    result = run_search(config, progress=progress, resume_from=args.resume)
    bar.close()
    out = result.save(args.out)
    a = result.allocation
    print(json.dumps({"manifest": str(out / "manifest.json"), "gates": str(out / "gates.safetensors"),
                      "granularity": a.granularity, "sparsity_target": a.sparsity_target,
                      "sparsity_achieved": a.sparsity_achieved}, indent=1))
    return 0


def cmd_eval(args) -> int:
    from consa import evaluation
    from consa.manifest import load_allocation
    from consa.search import load_model, pick_device

    allocation = load_allocation(args.allocation) if args.allocation else None
    model, tokenizer = load_model(args.model, args.revision, pick_device(args.device))
    result = evaluation.evaluate(model, tokenizer, allocation, data=args.data, seq_len=args.seq_len,
                                 num_sequences=args.num_sequences, retrieval_docs=args.retrieval_docs,
                                 seed=args.seed)
    print(json.dumps(result, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="consa", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_search_parser(sub)
    _add_eval_parser(sub)
    return parser


COMMANDS = {"search": cmd_search, "eval": cmd_eval}


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ConsaError, ValueError, FileNotFoundError) as e:
        print(f"consa {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Cancelled as e:
        print(f"consa {args.command}: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
