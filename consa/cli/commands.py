"""The `consa` command line: search, eval, compare, export, generate, and (with the service extra) serve, keys, jobs."""

import argparse
import json
import sys
from pathlib import Path

from consa.cli.settings_args import add_setting_args
from consa.core.artifacts import ARTIFACTS, CHECKPOINT
from consa.core.config import RunOptions, SearchConfig, setting_names
from consa.core.errors import Cancelled, ConsaError
from consa.core.config import GRANULARITIES


def _add_model_args(p):
    p.add_argument("--model", required=True, help="local model directory (or a hub id where online)")
    p.add_argument("--revision", default=None)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")


def _add_search_parser(sub):
    p = sub.add_parser("search", help="learn an FA/SWA allocation for a model")
    add_setting_args(p, SearchConfig)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--resume", default=None, help="gates.safetensors of an earlier run to continue from")
    p.add_argument("--gpus", type=int, default=1,
                   help="run one search data-parallel over N GPUs (N processes, one per GPU, under "
                        "torch.distributed.run: the same as `torchrun --nproc-per-node N -m consa search ...`; "
                        "with --device cpu, N CPU processes)")
    p.add_argument("--out", required=True, help=f"output directory: {', '.join(ARTIFACTS)}, as the run options ask")
    add_setting_args(p, RunOptions)
    p.add_argument("--checkpoint", action="store_true", help=f"export the hybrid model ({CHECKPOINT.name})")


def _add_eval_parser(sub):
    p = sub.add_parser("eval", help="evaluate a model under an allocation (hard gates); prints JSON")
    _add_model_args(p)
    p.add_argument("--allocation", default=None, help="manifest.json (omit for the unmodified model, or for a "
                   "`consa export` directory: the allocation it was exported with)")
    p.add_argument("--data", required=True)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--num-sequences", type=int, default=16)
    p.add_argument("--retrieval-docs", type=int, default=0, help="multi-key retrieval documents to score")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ruler-lengths", default="", metavar="N,N,...",
                   help="also score RULER's synthetic long-context tasks (needles, variable tracking, common and "
                        "frequent words; haystack from --data) at these context lengths, e.g. 1024,2048")
    p.add_argument("--ruler-tasks", default="", help="comma list of RULER tasks (default: all; see consa.evaluation.ruler)")
    p.add_argument("--ruler-samples", type=int, default=10, help="RULER prompts per task and length")
    p.add_argument("--lm-eval-task-dir", default=None, metavar="DIR",
                   help="write the evaluated rows as an lm-evaluation-harness task there (--include_path DIR "
                        "--tasks consa_rows) and print, under lm_eval, the numbers lm-eval gives for them")


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} takes a comma list of token counts, got {text!r}") from None


def cmd_search(args) -> int:
    from tqdm import tqdm

    from consa.model.devices import env_world_size, is_main_process
    from consa.recipe.pipeline import run_allocation

    config = SearchConfig.from_dict({name: getattr(args, name) for name in setting_names()})
    if args.gpus < 1:
        raise ValueError(f"--gpus must be at least 1, got {args.gpus}")
    if args.gpus > 1 and env_world_size() == 1:
        return _relaunch_data_parallel(args)
    if not is_main_process():  # torchrun: ranks 1..N-1 only search; rank 0 reports and writes the outputs
        from consa.search.loop import run_search

        run_search(config, resume_from=args.resume, device=args.device)
        return 0
    bar = tqdm(total=config.steps, desc="search", unit="step", file=sys.stderr)

    def progress(rec):
        if rec.get("phase", "search") != "search":
            bar.close()  # the search is over (its time stays on the bar); the later phases print events
            return
        bar.n = rec["step"]
        bar.set_postfix(loss=f"{rec['loss']:.4f}", s=f"{rec['sparsity']:.3f}", t=f"{rec['target']:.3f}")

    def event(type, message):
        bar.write(f"{type}: {message}" if type != "info" else message, file=sys.stderr)

    options = RunOptions.from_dict(vars(args))
    run = run_allocation(config, args.out, **options.to_dict(), checkpoint=args.checkpoint,
                         device=args.device, resume_from=args.resume, progress=progress, on_event=event)
    bar.close()
    a = run.search.allocation
    print(json.dumps({**{name.split(".")[0]: str(path) for name, path in run.artifacts.items()},
                      "granularity": a.granularity, "sparsity_target": a.sparsity_target,
                      "sparsity_achieved": a.sparsity_achieved}, indent=1))
    return 0


def _relaunch_data_parallel(args) -> int:
    """`consa search --gpus N`: the same command, once per GPU, under torch.distributed.run (torchrun)."""
    import subprocess

    import torch

    if args.device != "cpu" and torch.cuda.device_count() < args.gpus:
        raise ConsaError(f"--gpus {args.gpus}: this machine has {torch.cuda.device_count()} GPU(s)")
    rest, skip = [], False
    for token in args.argv:  # the command line as given, without --gpus (each rank runs one share)
        if skip or token.startswith("--gpus="):
            skip = False
            continue
        skip = token == "--gpus"
        if not skip:
            rest.append(token)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.gpus}",
           "-m", "consa", *rest]
    return subprocess.run(cmd).returncode


def _eval_model(args):
    """(model, tokenizer, the allocation a `consa export` directory carries, else None) for `consa eval`."""
    from consa.model.devices import pick_device
    from consa.model.loading import LOAD_ERRORS, is_export, load_error, load_model

    if not is_export(args.model):
        return (*load_model(args.model, args.revision, pick_device(args.device)), None)
    # An export: a kv_head one names remote code in its auto_map, which a plain from_pretrained refuses.
    # load_hybrid reads either format without running that file, and importing consa.export.checkpoint
    # registers consa_hybrid, so AutoTokenizer asks no remote-code question either.
    import torch
    from transformers import AutoTokenizer

    from consa.export.checkpoint import load_hybrid

    try:
        model = load_hybrid(args.model, device=pick_device(args.device), dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    except LOAD_ERRORS as e:
        raise load_error(args.model, e) from None
    tokenizer.model_max_length = int(1e12)  # as load_model: documents are packed into seq_len rows
    return model, tokenizer, model.consa_allocation


def cmd_eval(args) -> int:
    from consa.evaluation import metrics as evaluation
    from consa.core.manifest import load_allocation

    allocation = load_allocation(args.allocation) if args.allocation else None
    ruler_lengths = _int_list(args.ruler_lengths, "--ruler-lengths")
    model, tokenizer, exported = _eval_model(args)
    # Without --allocation an export is scored as exported; evaluate() with None would open every gate.
    allocation = allocation or exported
    eval_set = evaluation.build_eval_set(tokenizer, args.data, seq_len=args.seq_len, num_sequences=args.num_sequences,
                                         retrieval_docs=args.retrieval_docs, seed=args.seed,
                                         ruler_lengths=ruler_lengths, ruler_samples=args.ruler_samples,
                                         ruler_tasks=[t for t in args.ruler_tasks.split(",") if t] or None)
    result = evaluation.evaluate(model, tokenizer, allocation, data=eval_set)
    if args.lm_eval_task_dir:
        from consa.evaluation import harness

        task = harness.write_lm_eval_task(tokenizer, eval_set.rows, args.lm_eval_task_dir)
        granularity = allocation.granularity if allocation is not None else None
        result["lm_eval"] = {**{k: v for k, v in task.items() if k != "docs"},
                             "command": harness.lm_eval_command(task["include_path"], remote_code=granularity == "kv_head" or bool(getattr(allocation, "sink_tokens", 0))),
                             **harness.lm_eval_reference(model, tokenizer, allocation, task["docs"])}
    print(json.dumps(result, indent=1))
    return 0


def _add_compare_parser(sub):
    p = sub.add_parser("compare", help="evaluate several allocations (and baselines) on the same data")
    _add_model_args(p)
    p.add_argument("--allocation", action="append", default=[], metavar="MANIFEST",
                   help="manifest.json to compare (repeatable)")
    p.add_argument("--baselines", default="", help="comma list of baseline names, or 'all' (see consa.evaluation.baselines)")
    p.add_argument("--sparsity", type=float, default=None, help="sparsity for the baselines (default: the first allocation's)")
    p.add_argument("--granularity", default=None, choices=GRANULARITIES,
                   help="granularity for the baselines (default: the first allocation's)")
    p.add_argument("--window", type=int, default=None, help="window for the baselines (default: the first allocation's)")
    p.add_argument("--data", required=True)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--num-sequences", type=int, default=16)
    p.add_argument("--retrieval-docs", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="directory for comparison.md, comparison.json and heatmaps")


def _add_export_parser(sub):
    p = sub.add_parser("export", help="write a hybrid checkpoint (HF directory) or a DuoAttention pattern folder")
    _add_model_args(p)
    p.add_argument("--allocation", required=True, help="manifest.json")
    p.add_argument("--out", required=True, help="output directory (created when missing)")
    p.add_argument("--format", default="hf", choices=["hf", "duo", "duo-tsv"],
                   help="hf: a checkpoint directory; duo (alias duo-tsv): the folder DuoAttention's "
                        "load_attn_pattern reads (full_attention_heads.tsv + config.json)")
    p.add_argument("--layer-format", default="auto", choices=["auto", "layer_types", "consa"],
                   help="layer hybrids: stock layer_types where the family has them (auto), only that, or consa's")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights on disk (auto: the source checkpoint's)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, as transformers takes it")
    p.add_argument("--finetune-steps", type=int, default=0, help="short fine-tune with the allocation fixed")
    p.add_argument("--data", default=None, help="text data for --finetune-steps")
    p.add_argument("--seq-len", type=int, default=512)
    p = sub.add_parser("import-duo", help="turn a DuoAttention pattern folder (or TSV) into a consa manifest")
    p.add_argument("pattern", help="a folder with full_attention_heads.tsv + config.json, or a bare TSV")
    p.add_argument("--out", required=True, help="manifest.json to write")
    p.add_argument("--model", default="unknown", help="the model the pattern is for (recorded in the manifest)")
    p.add_argument("--granularity", default="kv_head", choices=GRANULARITIES)
    p.add_argument("--sparsity", type=float, default=None,
                   help="binarise learned gate values at this SWA share (default: values >= --threshold are full)")
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--window", type=int, default=None, help="default: the folder's recent_size")
    p.add_argument("--sink-tokens", type=int, default=None, help="default: the folder's sink_size")


def cmd_compare(args) -> int:
    from consa.evaluation import baselines
    from consa.evaluation.compare import baseline_allocations, compare, markdown_table
    from consa.model.devices import pick_device
    from consa.model.loading import load_model
    from consa.core.manifest import load_allocation

    allocations = {"full": None}
    for path in args.allocation:
        a = load_allocation(path)
        allocations[f"{a.method}-{a.granularity}-{a.sparsity_achieved:g}"] = a
    first = next((a for a in allocations.values() if a is not None), None)
    sparsity = args.sparsity if args.sparsity is not None else getattr(first, "sparsity_achieved", None)
    granularity = args.granularity or getattr(first, "granularity", None)
    window = args.window or getattr(first, "window", None)
    model, tokenizer = load_model(args.model, args.revision, pick_device(args.device))
    names = baselines.baseline_names(granularity) if args.baselines == "all" else [n for n in args.baselines.split(",") if n]
    if names and None in (sparsity, granularity, window):
        raise ValueError("baselines need --sparsity, --granularity and --window (or an --allocation to take them from)")
    allocations |= baseline_allocations(names, model, tokenizer, sparsity=sparsity, granularity=granularity,
                                        window=window, seed=args.seed, calibration_data=args.data,
                                        seq_len=args.seq_len, model_name=args.model,
                                        on_event=lambda type, message: print(message, file=sys.stderr))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = compare(model, tokenizer, allocations, data=args.data, seq_len=args.seq_len,
                      num_sequences=args.num_sequences, retrieval_docs=args.retrieval_docs, seed=args.seed,
                      window=window, out_dir=out, progress=lambda line: print(line, file=sys.stderr))
    table = markdown_table(records)
    (out / "comparison.md").write_text(table + "\n")
    (out / "comparison.json").write_text(json.dumps(records, indent=1))
    print(table)
    return 0


def cmd_export(args) -> int:
    from consa.export.duo_format import write_duo_pattern
    from consa.export.checkpoint import export_hybrid
    from consa.core.manifest import load_allocation
    from consa.model.devices import pick_device

    allocation = load_allocation(args.allocation)
    if args.format in ("duo", "duo-tsv"):
        print(write_duo_pattern(allocation, args.out))
        return 0
    summary = export_hybrid(args.model, allocation, args.out, finetune_steps=args.finetune_steps, data=args.data,
                            seq_len=args.seq_len, device=str(pick_device(args.device)), dtype=args.dtype,
                            layer_format=args.layer_format, max_shard_size=args.max_shard_size)
    print(json.dumps(summary, indent=1, default=str))
    return 0


def cmd_import_duo(args) -> int:
    from consa.export.duo_format import read_duo_tsv

    allocation = read_duo_tsv(args.pattern, model=args.model, window=args.window, sink_tokens=args.sink_tokens,
                              granularity=args.granularity, sparsity=args.sparsity, threshold=args.threshold)
    print(allocation.save(args.out))
    return 0


def _add_generate_parser(sub):
    p = sub.add_parser("generate", help="run a hybrid checkpoint: stream a continuation, report the KV cache it held")
    p.add_argument("--model", required=True, help="a directory written by `consa export`")
    p.add_argument("--prompt", help="text to continue (default: standard input)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; above 0 samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")


def cmd_generate(args) -> int:
    import time

    import torch
    from transformers import AutoTokenizer, TextStreamer

    from consa.runtime.cache import make_cache
    from consa.export.checkpoint import load_hybrid
    from consa.model.hybrid_attention import model_shape
    from consa.runtime.cache import cache_bytes
    from consa.runtime.kv_accounting import head_dim_of, kv_bytes
    from consa.runtime.generation import cache_kwarg
    from consa.model.devices import pick_device

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be 0 (greedy) or more, got {args.temperature}")
    device = pick_device(args.device)
    model = load_hybrid(args.model, device=device)
    try:
        # No remote code for the tokenizer: it needs none, and transformers would otherwise stop to ask
        # about a consa-format checkpoint's modeling file, reading the answer from stdin (the prompt).
        tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ConsaError(f"{args.model} has no tokenizer to read the prompt with ({type(e).__name__})") from None
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    if ids.shape[1] == 0:
        raise ValueError("the prompt is empty")

    cache = make_cache(model)  # ours, so its bytes can be counted afterwards
    torch.manual_seed(args.seed)
    sampling = {"do_sample": True, "temperature": args.temperature} if args.temperature > 0 else {"do_sample": False}
    started = time.perf_counter()
    out = model.generate(ids, max_new_tokens=args.max_new_tokens, streamer=TextStreamer(tokenizer, skip_prompt=True),
                         pad_token_id=tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0,
                         **{cache_kwarg(model): cache}, **sampling)
    seconds = time.perf_counter() - started
    new = out.shape[1] - ids.shape[1]
    tokens = cache.get_seq_length()
    element = next(model.parameters()).element_size()  # the cache holds K/V in the model's dtype
    full = kv_bytes(None, model_shape(model), tokens, head_dim_of(model), element)["kv_bytes_full"]
    held = cache_bytes(cache)
    print(f"\n{new} tokens in {seconds:.2f}s ({new / seconds:.1f} tok/s) on {device}; KV cache after {tokens} tokens: "
          f"{held / 2**20:.2f} MiB, full attention would hold {full / 2**20:.2f} MiB ({held / full:.3f})",
          file=sys.stderr)
    return 0


def _add_service_parsers(sub):
    p = sub.add_parser("serve", help="run the API and a local worker (embedded defaults: SQLite, no Redis)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    keys = sub.add_parser("keys", help="manage API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create an API key; the key is the last line printed")
    create.add_argument("name")
    keys_sub.add_parser("list", help="list the keys: name, prefix, created, revoked")
    revoke = keys_sub.add_parser("revoke", help="revoke every key with this name (refused with 401 at once)")
    revoke.add_argument("name")


def service_command(name: str):
    """The service's `consa NAME`, found through the `consa.commands` entry points that the service
    registers (pyproject.toml): the library itself never imports the service."""
    from importlib.metadata import entry_points

    found = list(entry_points(group="consa.commands", name=name))
    try:
        if not found:
            raise ImportError(name=f"entry point consa.commands:{name}")
        return found[0].load()
    except ImportError as e:
        raise ConsaError(f"the service is not installed ({e.name} missing): pip install 'consa[service]'") from None


def cmd_serve(args) -> int:
    return service_command("serve")(args)


def cmd_keys(args) -> int:
    return service_command("keys")(args)


def cmd_jobs(args) -> int:
    from consa.cli.jobs import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    from consa.cli.jobs import add_jobs_commands

    from consa.core.version import __version__

    parser = argparse.ArgumentParser(prog="consa", description=__doc__)
    parser.add_argument("--version", action="version", version=f"consa {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_search_parser(sub)
    _add_eval_parser(sub)
    _add_compare_parser(sub)
    _add_export_parser(sub)
    _add_generate_parser(sub)
    _add_service_parsers(sub)
    add_jobs_commands(sub)
    return parser


COMMANDS = {"search": cmd_search, "eval": cmd_eval, "compare": cmd_compare, "export": cmd_export,
            "import-duo": cmd_import_duo,
            "generate": cmd_generate, "serve": cmd_serve, "keys": cmd_keys, "jobs": cmd_jobs}


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # `search --gpus` relaunches it
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
