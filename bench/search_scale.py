"""Search step cost at the sizes users bring: step time vs a plain forward+backward, memory, MFU, GPUs.

    python3 bench/search_scale.py --out $OUT                                   # 1 GPU
    torchrun --standalone --nproc-per-node 2 bench/search_scale.py --out $OUT  # 2 GPUs, data-parallel
    python3 bench/search_scale.py --mode testbed --out $OUT                    # objectives on the testbed
    python3 bench/search_scale.py --mode loss --out $OUT                       # chunked vs fused loss kernels
    python3 bench/search_scale.py --mode saved --kernels off,auto --out $OUT    # saved bytes vs the estimate
    python3 bench/search_scale.py --mode rounding --shapes llama-small --contexts 2048  # fp32 vs bf16 gate gradient

Scale mode: for each shape (random weights from a config built here: nothing is downloaded) and
context, a few real search steps (consa.search.loop.run_search: kv_head, s = 0.5, window 1024, objective
lm, default settings) and a plain pass of the same frozen model on the same tokens: forward from
the input embeddings (which require grad), the same chunked LM loss, backward to the embeddings, no
weight gradients, same activation checkpointing as the search chose. Each record: {shape, context,
gpus, step_s, plain_step_s, ratio, tokens_per_s, peak_gib, mfu, ok, error, ...}; mfu counts the
plain pass's useful FLOPs (matmuls forward + input-gradient backward, causal attention forward +
2.5x backward; no recomputation) per GPU against the H200's dense bf16 peak, 989 TFLOP/s.
"""

import argparse
import gc
import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench.corpora import TRAIN_TEXT, held_out_text  # noqa: E402

import torch  # noqa: E402

from consa.search import fused_kernels
from consa.search import memory
from consa.search import objectives  # noqa: E402
from consa.core.config import SearchConfig  # noqa: E402
from consa.core.errors import Cancelled  # noqa: E402
from consa.model.devices import pick_device  # noqa: E402
from consa.search.loop import run_search  # noqa: E402

PEAK_FLOPS = 989e12  # H200 SXM dense bf16
SHAPES = {
    "qwen3-0.6b": dict(model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       tie_word_embeddings=True, rope_theta=1e6),
    "qwen3-1.7b": dict(model_type="qwen3", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       tie_word_embeddings=True, rope_theta=1e6),
    "llama3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                      tie_word_embeddings=False, rope_theta=5e5),
    # a random Llama small enough for the CPU: --mode rounding
    "llama-small": dict(model_type="llama", vocab_size=1000, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False,
                        rope_theta=5e5),
    # CPU check of this script only
    "tiny": dict(model_type="qwen3", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True),
}


def log(msg: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build(shape: str, device, dtype=torch.bfloat16):
    from transformers import AutoConfig, AutoModelForCausalLM

    if shape not in SHAPES:  # a local model directory (the testbed): real weights
        from consa.core.config import SearchConfig
        from consa.model.sharding import load_for_search

        return load_for_search(SearchConfig(model=shape, sparsity=0.5, dtype="bfloat16" if dtype == torch.bfloat16
                                            else "float32"), device)[0].eval()
    spec = dict(SHAPES[shape])
    cfg = AutoConfig.for_model(spec.pop("model_type"), max_position_embeddings=1 << 18, **spec)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def useful_flops(model, tokens_per_row: int, rows: int) -> float:
    """FLOPs of a plain forward + input-gradient backward: 2x(2 N tokens) for the matmuls (every linear
    weight, the LM head included), causal attention 2 T^2 H d per layer forward and 2.5x that backward."""
    cfg = model.config
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    attn_fwd = 2 * tokens_per_row ** 2 * cfg.num_attention_heads * cfg.head_dim * cfg.num_hidden_layers
    return rows * (4 * linear * tokens_per_row + 3.5 * attn_fwd)


class Deadline(Exception):
    pass


def _alarm(signum, frame):
    raise Deadline("record time limit reached")


def timed_search(model, context: int, batch: int, world: int, device, budget_s: float,
                 checkpointing: str = "auto", kernels: str = "auto", objective: str = "lm") -> tuple[float, dict]:
    """Run search steps: the first warms up (compiles, allocates); then up to two timed ones.
    Returns (best timed step s, facts about the run)."""
    starts, times = [], []

    def should_cancel():
        starts.append(time.perf_counter())
        return bool(enough(times, budget_s))

    def progress(rec):
        times.append(time.perf_counter() - starts[-1])

    checkpointing, _, option = checkpointing.partition("+")  # "+nokeep": never keep attention outputs
    config = SearchConfig(model="random", sparsity=0.5, granularity="kv_head", window=1024, seq_len=context,
                          batch_size=batch, steps=4, retrieval_ratio=0.0, gradient_checkpointing=checkpointing,
                          fused_kernels=kernels, objective=objective)
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(1, model.config.vocab_size, (config.steps * batch * world, context), generator=g)
    fused = fused_kernels.apply(model) if kernels == "auto" else []  # what the search will install
    fused_kernels.remove(model)
    try:
        run_search(config, model=model, dataset=rows, progress=progress, should_cancel=should_cancel, device=device,
                   keep_attention=option != "nokeep")
    except Cancelled:
        pass
    if torch.distributed.is_initialized():  # rank 0's times, for every rank
        box = [times]
        torch.distributed.broadcast_object_list(box, src=0)
        times = box[0]
    checkpointed, keeps_attention = getattr(model, "consa_checkpointing", (0, False))
    return best(times), {"timed_steps": max(1, len(times) - 1), "checkpointed_layers": checkpointed,
                         "keeps_attention": keeps_attention, "objective": objective,
                         "fused_kernels": fused,
                         "weights_dtype": str(next(model.parameters()).dtype)}


def plain_step(model, batch_rows: torch.Tensor) -> None:
    """Forward from the input embeddings, the search's chunked LM loss, backward to the embeddings."""
    emb = model.get_input_embeddings()(batch_rows).detach().requires_grad_(True)  # (B, T, D)
    hidden = model.get_decoder()(inputs_embeds=emb, use_cache=False).last_hidden_state[:, :-1]
    loss = objectives.token_nll(model, hidden, batch_rows[:, 1:]).mean()
    loss.backward()
    assert emb.grad is not None


def timed_plain(model, context: int, batch: int, device, budget_s: float, kernels: str = "auto") -> float:
    """The plain pass, with the same fused kernels as the search where it used them."""
    model.consa_hybrid.set_gates(None)  # every unit full: the hybrid function runs plain SDPA
    rows = torch.randint(1, model.config.vocab_size, (batch, context), device=device)
    times = []
    if kernels == "auto":
        fused_kernels.apply(model)
    try:
        while not enough(times, budget_s):
            sync(device)
            t0 = time.perf_counter()
            plain_step(model, rows)
            sync(device)
            times.append(time.perf_counter() - t0)
    finally:
        fused_kernels.remove(model)
    return best(times)


def enough(times: list[float], budget_s: float) -> bool:
    warm = times[1:]
    # The first step always warms up (compiles, allocates): under torchrun its compile alone took 25 s.
    return bool(len(warm) >= 2 or (warm and (warm[-1] > 4.0 or sum(times) > budget_s)))


def best(times: list[float]) -> float:
    return min(times[1:]) if len(times) > 1 else times[0]


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def prewarm_flex(model, context: int, batch: int, device) -> None:
    """Compile FlexAttention's SWA kernel (forward + backward) for this shape before the timed steps."""
    from consa.model.hybrid_attention import flex_sliding_window

    if torch.device(device).type != "cuda" or context < 1024:
        return
    cfg = model.config
    q = torch.randn(batch, cfg.num_attention_heads, context, cfg.head_dim, device=device, dtype=torch.bfloat16,
                    requires_grad=True)  # all three need grad in the search (the gates sit below them)
    k, v = (torch.randn(batch, cfg.num_key_value_heads, context, cfg.head_dim, device=device, dtype=torch.bfloat16,
                        requires_grad=True) for _ in range(2))
    flex_sliding_window(q, k, v, 1024, 0, cfg.head_dim ** -0.5).sum().backward()


def scale_record(model, shape: str, context: int, batch: int, world: int, device, budget_s: float,
                 checkpointing: str = "auto", kernels: str = "auto", objective: str = "lm") -> dict:
    """checkpointing: the search's setting (auto/on/off); "+nokeep": checkpointed layers never keep their
    attention outputs (run_search's keep_attention=False). kernels: its fused_kernels setting."""
    rec = {"shape": shape, "context": context, "batch": batch, "gpus": world, "checkpointing": checkpointing,
           "kernels": kernels, "ok": False, "error": None}
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(int(budget_s * 2.5) + 30)
    try:
        prewarm_flex(model, context, batch, device)
        rec["step_s"], extra = timed_search(model, context, batch, world, device, budget_s, checkpointing, kernels,
                                            objective)
        rec.update(extra)
        rec["plain_step_s"] = timed_plain(model, context, batch, device, budget_s, kernels)
        rec["ratio"] = round(rec["step_s"] / rec["plain_step_s"], 3)
        rec["tokens_per_s"] = round(world * batch * context / rec["step_s"], 1)
        flops = useful_flops(model, context, batch)
        rec["mfu"] = round(flops / rec["step_s"] / PEAK_FLOPS, 4)
        rec["plain_mfu"] = round(flops / rec["plain_step_s"] / PEAK_FLOPS, 4)
        rec["ok"] = True
    except (torch.OutOfMemoryError, Deadline, RuntimeError) as e:
        rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    finally:
        signal.alarm(0)
    rec["peak_gib"] = None  # a GPU's figure only
    if torch.device(device).type == "cuda":
        rec["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return rec


def profile_step(model, context: int, batch: int, world: int, device, checkpointing: str, path: Path,
                 kernels: str = "auto") -> None:
    """Where a search step's time goes: the kernels with the most CUDA time over two steps."""
    from torch.profiler import ProfilerActivity, profile

    try:
        tables = []
        for name, run in (("search", lambda: timed_search(model, context, batch, world, device, 0.0, checkpointing,
                                                          kernels)),
                          ("plain", lambda: timed_plain(model, context, batch, device, 0.0, kernels))):
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                run()
            table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=90)
            tables.append(f"{name} (two steps), checkpointing {checkpointing}, kernels {kernels}\n{table}")
        if int(os.environ.get("RANK", "0")) == 0:
            path.write_text("\n\n".join(tables))
    except Exception as e:  # a profile is a diagnosis, never a reason to lose the records
        log(f"profile failed: {type(e).__name__}: {e}")


def run_scale(args) -> list[dict]:
    from consa.model.devices import data_parallel, local_device

    device = local_device() if args.device == "auto" else torch.device(args.device)
    world = data_parallel(device).world_size  # joins the group under torchrun
    records = []
    out = Path(args.out) / (args.name or f"search_scale_{world}gpu.json")
    for shape in args.shapes.split(","):
        try:
            model = build(shape, device, torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)
        except torch.OutOfMemoryError as e:
            records.append({"shape": shape, "gpus": world, "ok": False, "error": f"build: {e}"[:300]})
            continue
        for context in map(int, args.contexts.split(",")):
            for kernels in args.kernels.split(","):
                for checkpointing in args.checkpointing.split(","):
                    rec = scale_record(model, shape, context, args.batch, world, device, args.budget, checkpointing,
                                       kernels, args.objective)
                    log(json.dumps(rec))
                    records.append(rec)
                    if int(os.environ.get("RANK", "0")) == 0:
                        out.write_text(json.dumps(records, indent=1))  # after every record: a later OOM keeps these
            if args.profile and rec["ok"] and torch.device(device).type == "cuda":
                profile_step(model, context, args.batch, world, device, args.checkpointing.split(",")[-1],
                             Path(args.out) / f"profile_{shape}_{context}_{world}gpu.txt", args.kernels.split(",")[-1])
        del model
        gc.collect()
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    return records


# -- what autograd keeps per layer, against consa.search.memory's estimate ---------------------------------------
def saved_per_layer(model, context: int, device) -> tuple[float, torch.Tensor]:
    """(bytes autograd keeps per decoder layer, the gate gradient) for one soft-gated forward + backward of the
    decoder (frozen weights; the LM head is the loss's, checkpointed by consa.search.objectives: not counted)."""
    from consa.model.hybrid_attention import install, model_shape

    layers, kv_heads = model_shape(model)
    hybrid = install(model, min(1024, context // 4))  # a window shorter than the context, or the gradient is 0
    z = torch.full((layers, kv_heads), 0.5, device=device, requires_grad=True)
    hybrid.set_gates(z)
    rows = torch.randint(1, model.config.vocab_size, (1, context), device=device,
                         generator=torch.Generator(device).manual_seed(0))
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        cpu_mask = t.dim() == 4 and t.shape[1] == 1 and t.shape[-2:] == (context, context)  # the CPU's SWA path only
        if storage.data_ptr() not in weights and not cpu_mask:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=torch.device(device).type == "cuda"):
            hidden = model.get_decoder()(input_ids=rows, use_cache=False).last_hidden_state
        hidden.float().pow(2).mean().backward()
    hybrid.set_gates(None)
    final_norm = context * model.config.hidden_size * 4  # the last norm's fp32 input (or its own input)
    return (sum(saved.values()) - final_norm) / layers, z.grad.detach().float().cpu()


def run_saved(args) -> list[dict]:
    """Per shape and context: autograd's saved bytes per layer with transformers' kernels and with the fused
    ones, each against consa.search.memory's estimate; and how far the fused kernels move the gate gradient."""
    device = pick_device(args.device)
    gpu = device.type == "cuda"
    records = []
    for shape in args.shapes.split(","):
        model = build(shape, device, torch.bfloat16 if gpu else torch.float32)
        for p in model.parameters():
            p.requires_grad_(False)
        qk_norm = any(hasattr(m, "q_norm") for m in model.modules())
        for context in map(int, args.contexts.split(",")):
            grads = []
            for kernels in args.kernels.split(","):  # "off,off,auto": the second "off" measures the run-to-run noise
                fused = fused_kernels.apply(model) if kernels == "auto" else []
                try:
                    measured, grad = saved_per_layer(model, context, device)
                    grads.append(grad.flatten())
                finally:
                    fused_kernels.remove(model)
                est = memory.estimate_step(model.config, context, 1, 2 if gpu else 4, fused=fused, qk_norm=qk_norm)
                rec = {"shape": shape, "context": context, "kernels": kernels, "fused_kernels": fused,
                       "saved_per_layer_bytes": int(measured), "estimate_per_layer_bytes": est.per_layer,
                       "measured_over_estimate": round(measured / est.per_layer, 3),
                       "per_token_layer_kb": round(measured / context / 1000, 1)}
                if len(grads) > 1:  # the gate gradient against the first setting's
                    first, grad = grads[0], grads[-1]
                    rec["gate_grad_rel_l2_vs_first"] = float((grad - first).norm() / first.norm().clamp(min=1e-30))
                    rec["gate_grad_cosine_vs_first"] = float(torch.nn.functional.cosine_similarity(grad, first, dim=0))
                log(json.dumps(rec))
                records.append(rec)
                (Path(args.out) / (args.name or "search_scale_saved.json")).write_text(json.dumps(records, indent=1))
                gc.collect()
                if gpu:
                    torch.cuda.empty_cache()
        del model
        gc.collect()
    return records


def run_rounding(args) -> list[dict]:
    """How much rounding alone moves the gate gradient: float32 vs bfloat16 weights, same code and tokens. On
    random weights the gradient is small and rounding moves it far; on trained weights it barely does. This is
    the yardstick for the fused kernels' difference in --mode saved."""
    device = pick_device(args.device)
    records = []
    for shape in args.shapes.split(","):
        for context in map(int, args.contexts.split(",")):
            grads = []
            for dtype in (torch.float32, torch.bfloat16):
                model = build(shape, device, dtype)
                for p in model.parameters():
                    p.requires_grad_(False)
                grads.append(saved_per_layer(model, context, device)[1].flatten())
                del model
            full, rounded = grads
            rec = {"shape": shape, "context": context, "gate_grad_norm_fp32": float(full.norm()),
                   "bf16_rel_l2_vs_fp32": float((rounded - full).norm() / full.norm().clamp(min=1e-30)),
                   "bf16_cosine_vs_fp32": float(torch.nn.functional.cosine_similarity(rounded, full, dim=0))}
            log(json.dumps(rec))
            records.append(rec)
    (Path(args.out) / (args.name or "search_scale_rounding.json")).write_text(json.dumps(records, indent=1))
    return records


# -- objectives on the testbed ------------------------------------------------------------------------
def run_testbed(args) -> list[dict]:
    """lm vs distill vs distill-hidden (kv_head, s = 0.5, W = 256, 4k) on the testbed model; with
    torchrun, the lm search data-parallel over the ranks (rank 0 evaluates)."""
    from consa.model.devices import data_parallel, is_main_process, local_device
    from consa.evaluation.metrics import build_eval_set, evaluate
    from consa.model.sharding import load_for_search

    device = local_device() if args.device == "auto" else torch.device(args.device)
    world = data_parallel(device).world_size
    base = SearchConfig(model=args.testbed, sparsity=0.5, granularity="kv_head", window=256, seq_len=args.testbed_seq_len,
                        steps=args.testbed_steps, dataset=args.train_data or TRAIN_TEXT)
    model, tokenizer = load_for_search(base, device)
    eval_set = None
    if is_main_process():
        eval_set = build_eval_set(tokenizer, args.eval_data or held_out_text(), seq_len=base.seq_len,
                                  num_sequences=32, retrieval_docs=args.retrieval_docs, seed=0)
    records = []
    out = Path(args.out) / (args.name or f"search_scale_testbed_{world}gpu.json")
    objectives_run = args.objectives.split(",") if world == 1 else ["lm"]
    if is_main_process():
        full = evaluate(model, tokenizer, None, data=eval_set)
        records.append({"method": "full", "gpus": world, "loss": full["loss"], "retrieval_acc": full["retrieval_acc"]})
    for name in objectives_run:
        for kernels in args.kernels.split(","):
            config = SearchConfig.from_dict({**base.to_dict(), "objective": name, "fused_kernels": kernels})
            t0 = time.time()
            result = run_search(config, model=model, tokenizer=tokenizer, device=device, log_every=50)
            if not is_main_process():
                continue
            res = evaluate(model, tokenizer, result.allocation, data=eval_set)
            rec = {"method": f"learned-{name}", "gpus": world, "batch_per_gpu": config.batch_size, "steps": config.steps,
                   "kernels": kernels, "fused_kernels": result.allocation.training["fused_kernels_used"],
                   "loss": res["loss"], "retrieval_acc": res["retrieval_acc"], "search_s": round(time.time() - t0, 1),
                   "final_expected_sparsity": result.allocation.training["final_expected_sparsity"],
                   "sparsity_achieved": result.allocation.sparsity_achieved,
                   "assignment": ["".join("F" if v == "full" else "." for v in row) for row in result.allocation.assignment]}
            log(json.dumps(rec))
            records.append(rec)
            out.write_text(json.dumps(records, indent=1))
    return records


# -- the loss: chunked (consa.search.objectives) vs a fused linear cross-entropy kernel (liger-kernel) --------
def run_loss(args) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokens, d, vocab = (args.loss_tokens, 4096, 128256) if device.type == "cuda" else (256, 64, 512)
    head = torch.nn.Linear(d, vocab, bias=False, device=device, dtype=torch.bfloat16).requires_grad_(False)
    model = torch.nn.Module()
    model.lm_head = head
    model.config = type("C", (), {})()
    model.get_output_embeddings = lambda: head
    hidden = torch.randn(1, tokens, d, device=device, dtype=torch.bfloat16)
    targets = torch.randint(0, vocab, (1, tokens), device=device)

    def chunked():
        h = hidden.clone().requires_grad_(True)
        objectives.token_nll(model, h, targets).mean().backward()
        return h.grad

    def full():
        h = hidden.clone().requires_grad_(True)
        torch.nn.functional.cross_entropy(objectives.head_logits(model, h)[0], targets[0]).backward()
        return h.grad

    def liger():
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        h = hidden.clone().requires_grad_(True)
        LigerFusedLinearCrossEntropyLoss()(head.weight, h[0], targets[0]).backward()
        return h.grad

    records, reference = [], None
    for name, fn in (("full-logits", full), ("chunked", chunked), ("liger-fused-linear-ce", liger)):
        rec = {"kernel": name, "tokens": tokens, "hidden": d, "vocab": vocab, "ok": False}
        try:
            fn()
            sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            t0 = time.perf_counter()
            grad = fn()
            sync(device)
            rec["s"] = round(time.perf_counter() - t0, 4)
            if device.type == "cuda":
                rec["extra_peak_gib"] = round((torch.cuda.max_memory_allocated(device) - base) / 2**30, 2)
            reference = grad if reference is None else reference
            rec["grad_max_abs_diff_vs_full"] = float((grad.float() - reference.float()).abs().max())
            rec["ok"] = True
        except Exception as e:  # liger missing or failing is a result, not a crash
            rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        log(json.dumps(rec))
        records.append(rec)
    (Path(args.out) / (args.name or "search_scale_loss.json")).write_text(json.dumps(records, indent=1))
    return records


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", default="scale", choices=("scale", "testbed", "loss", "saved", "rounding"))
    p.add_argument("--out", default="bench/results/current")
    p.add_argument("--name", default=None, help="output file name (default by mode and GPU count)")
    p.add_argument("--shapes", default="qwen3-0.6b,qwen3-1.7b,llama3-8b")
    p.add_argument("--contexts", default="8192,32768,131072")
    p.add_argument("--batch", type=int, default=1, help="rows per GPU per step")
    p.add_argument("--budget", type=float, default=60.0, help="seconds of timed steps per record before it stops")
    p.add_argument("--device", default="auto")
    p.add_argument("--checkpointing", default="auto", help="comma-separated search settings per record: auto, on, "
                   "off, each optionally +nokeep (checkpointed layers never keep their attention outputs)")
    p.add_argument("--kernels", default="auto", help="comma-separated fused_kernels settings per record: auto, off")
    p.add_argument("--objective", default="lm", help="scale mode: the search objective of every record")
    p.add_argument("--profile", action="store_true", help="after each context, profile two steps (CUDA kernels)")
    p.add_argument("--testbed", default=".models/qwen3-code-26m")
    p.add_argument("--testbed-steps", type=int, default=250)
    p.add_argument("--testbed-seq-len", type=int, default=4096)
    p.add_argument("--objectives", default="lm,distill,distill-hidden")
    p.add_argument("--train-data", default=None)
    p.add_argument("--eval-data", default=None)
    p.add_argument("--retrieval-docs", type=int, default=100)
    p.add_argument("--loss-tokens", type=int, default=32768)
    args = p.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    return {"scale": run_scale, "testbed": run_testbed, "loss": run_loss, "saved": run_saved, "rounding": run_rounding}[args.mode](args)


if __name__ == "__main__":
    main()
