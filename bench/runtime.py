"""Runtime benchmark: KV-cache bytes, prefill time and decode speed of hybrid FA/SWA models vs full attention.

    python bench/runtime.py --testbed .models/qwen3-code-26m --out bench/results/current

Models: a Qwen3-0.6B-shaped model with RANDOM weights (speed does not depend on them) and the testbed
model. Allocations: exact-sparsity ones from consa.core.units.exact_swa_mask on seeded random scores (per KV
head, or per layer for layer granularity): for speed and bytes only the counts per layer matter.
Every configuration, full attention included, runs through the same runtime (consa.runtime.cache.HybridCache;
the baseline is the all-full allocation), bf16, batch 1. Prefill: one forward over the context. Decode:
greedy steps replayed from a CUDA graph of one decode forward (static FA storage, ring buffers for SWA
heads); eager decoding where graphs are unavailable (CPU).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from consa.runtime import decode_kernel  # noqa: E402
from consa.core.units import exact_swa_mask  # noqa: E402
from consa.model.hybrid_attention import apply_allocation, model_shape, uninstall  # noqa: E402
from consa.core.manifest import Allocation  # noqa: E402
from consa.runtime.cache import HybridCache  # noqa: E402
from consa.model.head_grouping import group_heads  # noqa: E402
from consa.runtime.cache import cache_bytes  # noqa: E402
from consa.runtime.kv_accounting import floor_ratio  # noqa: E402
from consa.runtime.generation import cache_kwarg, compile_layers  # noqa: E402

QWEN3_06B = dict(num_hidden_layers=28, num_key_value_heads=8, num_attention_heads=16, head_dim=128, hidden_size=1024,
                 intermediate_size=3072, vocab_size=151936, max_position_embeddings=40960, tie_word_embeddings=True)
TINY = dict(num_hidden_layers=4, num_key_value_heads=2, num_attention_heads=4, head_dim=8, hidden_size=32,
            intermediate_size=64, vocab_size=300, max_position_embeddings=4096, tie_word_embeddings=True)


def log(*args):
    print(*args, flush=True)


def random_qwen3(shape: dict, device, dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("qwen3", **shape)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model.eval()


def make_allocation(num_layers, num_kv_heads, sparsity, granularity, window, seed=0) -> Allocation:
    """Exactly round(s * N) SWA units, chosen by exact_swa_mask on seeded random scores."""
    scores = torch.rand(num_layers if granularity == "layer" else num_layers * num_kv_heads,
                        generator=torch.Generator().manual_seed(seed))
    swa = exact_swa_mask(scores, sparsity)
    full = ~(swa[:, None].expand(num_layers, num_kv_heads) if granularity == "layer" else swa.view(num_layers, num_kv_heads))
    return Allocation.from_full_mask(full, model="bench", granularity=granularity, window=window,
                                     method="random-exact", sparsity_target=sparsity)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def capture(step):
    """One call of `step` captured in a CUDA graph, after two warm-up calls on a side stream (as CUDA
    graphs require); returns the graph and the output tensor each replay rewrites."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out


@torch.no_grad()
def measure(model, allocation, context, decode_steps, device, use_graph, repeats=1, batch=1, compiled=False):
    """Prefill `batch` x `context` random tokens, then decode greedily; returns bytes and times."""
    # FA heads first in every layer (weights permuted to match; same function, fewer kernels per step).
    # For random weights a permutation on top of an earlier one changes nothing that speed depends on.
    apply_allocation(model, group_heads(model, allocation))
    kw = cache_kwarg(model)
    vocab = model.config.vocab_size
    ids = torch.randint(1, vocab, (batch, context), generator=torch.Generator().manual_seed(1)).to(device)
    max_length = context + decode_steps + 8

    def prefill():
        cache = HybridCache.for_model(model, max_length=max_length)
        sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{kw: cache})
        sync(device)
        return cache, out.logits[:, -1].argmax(-1, keepdim=True), time.perf_counter() - t0

    prefill()  # warm-up: kernels, allocator
    times = []
    for _ in range(repeats):
        cache, next_id, t = prefill()
        times.append(t)
    prefill_s = min(times)
    kv_bytes, kv_allocated = cache_bytes(cache), cache_bytes(cache, allocated=True)

    # decode: static input / position buffers so one captured forward can be replayed every step
    step_ids = next_id.clone()  # (1, 1)
    positions = torch.full((1, 1), context, dtype=torch.long, device=device)  # (1, 1)

    def step():
        return model(input_ids=step_ids, position_ids=positions, use_cache=True, logits_to_keep=1, **{kw: cache}).logits

    graph = None
    if compiled:  # decode only: prefill above ran the eager layers
        compile_layers(model)
    if use_graph:
        cache.set_graph_position(positions.view(1))
        graph, logits = capture(step)

    def run_decode(steps):
        for i in range(steps):
            positions.fill_(context + i)
            if graph is not None:
                graph.replay()
                out = logits
            else:
                out = step()
            step_ids.copy_(out[:, -1].argmax(-1, keepdim=True))

    if graph is not None:
        run_decode(4)  # warm replay
    sync(device)
    t0 = time.perf_counter()
    if graph is None:  # eager: the cache advances one token per call, so feed it in order
        for _ in range(decode_steps):
            out = model(input_ids=step_ids, use_cache=True, logits_to_keep=1, **{kw: cache}).logits
            step_ids.copy_(out[:, -1].argmax(-1, keepdim=True))
    else:
        run_decode(decode_steps)
    sync(device)
    decode_s = time.perf_counter() - t0
    if compiled:
        compile_layers(model, enable=False)
    del cache, graph
    return {"batch": batch, "compiled": compiled, "kv_bytes": kv_bytes, "kv_bytes_allocated": kv_allocated, "prefill_s": prefill_s,
            "decode_s": decode_s, "decode_tok_s": decode_steps / decode_s, "graph": use_graph}


@torch.no_grad()
def stock_decode(model, context, decode_steps, device, batch=1, compiled=False):
    """Full attention the stock way, as a check on the baseline: transformers' StaticCache + SDPA,
    one decode forward captured in a CUDA graph. Speed does not depend on the cached values, so a
    short prompt is prefilled and decoding starts at position `context` of a cache that long."""
    from transformers import StaticCache

    uninstall(model)
    kw = cache_kwarg(model)
    cache = StaticCache(config=model.config, max_cache_len=context + decode_steps + 8)
    ids = torch.randint(1, model.config.vocab_size, (batch, 16), generator=torch.Generator().manual_seed(1)).to(device)
    model(input_ids=ids, use_cache=True, logits_to_keep=1, **{kw: cache})
    step_ids = ids[:, -1:].clone()
    cache_position = torch.full((1,), context, dtype=torch.long, device=device)
    positions = cache_position.view(1, 1)
    if compiled:
        compile_layers(model)

    def step():
        return model(input_ids=step_ids, position_ids=positions.expand(batch, 1), cache_position=cache_position,
                     use_cache=True, logits_to_keep=1, **{kw: cache}).logits

    graph, logits = capture(step)
    for _ in range(4):
        graph.replay()
    sync(device)
    t0 = time.perf_counter()
    for i in range(decode_steps):
        cache_position.fill_(context + i)
        graph.replay()
        step_ids.copy_(logits[:, -1].argmax(-1, keepdim=True))
    sync(device)
    if compiled:
        compile_layers(model, enable=False)
    return decode_steps / (time.perf_counter() - t0)


@torch.no_grad()
def check_decode_kernel(device, dtype=torch.bfloat16):
    """The fused Triton decode kernel against plain attention, at the 0.6B shape's head sizes."""
    if not decode_kernel.available(device, dtype):
        return None
    torch.manual_seed(0)
    B, Hk, G, d, W, C, pos = 2, 8, 2, 128, 1024, 8192, 5000
    full = [h % 2 == 0 for h in range(Hk)]
    q, k_new, v_new = (torch.randn(B, n, d, device=device, dtype=dtype) for n in (Hk * G, Hk, Hk))
    fa_k, fa_v = (torch.randn(B, Hk // 2, C, d, device=device, dtype=dtype) for _ in range(2))
    swa_k, swa_v = (torch.randn(B, Hk // 2, W, d, device=device, dtype=dtype) for _ in range(2))
    swa_pos = torch.full((W,), -1, dtype=torch.long, device=device)
    out = decode_kernel.decode_step(q, k_new, v_new, fa_k, fa_v, swa_k, swa_v, swa_pos,
                                    torch.tensor([pos], device=device), decode_kernel.head_codes(full, device), W, 0)
    worst = 0.0
    for h in range(Hk):  # the kernel stored the new token, so the reference reads the updated cache
        k, v = (fa_k[:, h // 2, :pos + 1], fa_v[:, h // 2, :pos + 1]) if full[h] else (swa_k[:, h // 2], swa_v[:, h // 2])
        w = (q[:, h * G:(h + 1) * G].float() @ k.float().transpose(1, 2) * d ** -0.5).softmax(-1)
        worst = max(worst, (w @ v.float() - out[:, h * G:(h + 1) * G].float()).abs().max().item())
    log(f"decode kernel check ({dtype}): max |diff| vs fp32 reference = {worst:.2e}")
    return worst


@torch.no_grad()
def check_graph_decode(device, steps=6):
    """Graph-replayed decoding gives the logits of eager hybrid attention without eviction (tiny model)."""
    model = random_qwen3(TINY, device, torch.float32)
    alloc = make_allocation(4, 2, 0.5, "kv_head", 16)
    apply_allocation(model, group_heads(model, alloc))
    ids = torch.randint(1, 300, (1, 40), generator=torch.Generator().manual_seed(0)).to(device)
    kw = cache_kwarg(model)
    cache = HybridCache.for_model(model, max_length=64)
    nxt = model(input_ids=ids, use_cache=True, **{kw: cache}).logits[:, -1:].argmax(-1)
    step_ids, positions = nxt.clone(), torch.full((1, 1), 40, dtype=torch.long, device=device)
    cache.set_graph_position(positions.view(1))
    graph = torch.cuda.CUDAGraph()
    model(input_ids=step_ids, position_ids=positions, use_cache=True, **{kw: cache})  # warm-up (rewritten below)
    with torch.cuda.graph(graph):
        logits = model(input_ids=step_ids, position_ids=positions, use_cache=True, **{kw: cache}).logits
    worst = 0.0
    for i in range(steps):
        positions.fill_(40 + i)
        graph.replay()
        seq = torch.cat([ids, step_ids], 1)
        want = model(input_ids=seq, use_cache=False).logits[:, -1]  # no cache: the whole sequence, hybrid masks
        worst = max(worst, (logits[:, -1] - want).abs().max().item())
        ids = seq
        step_ids.copy_(logits[:, -1:].argmax(-1))
    log(f"graph decode check: max |logit diff| vs no-cache hybrid forward over {steps} steps = {worst:.2e}")
    return worst


def bench_model(name, model, window, args, device, records, references):
    num_layers, num_kv_heads = model_shape(model)
    use_graph = device.type == "cuda" and not args.no_graph
    compiled = args.compile
    weights = weight_bytes(model)
    runs = [(context, 1, args.granularities, args.sparsities) for context in args.contexts]
    # Larger batches: KV reads dominate decoding over per-kernel overheads (one configuration).
    runs += [(args.batch_context or max(args.contexts), b, ["kv_head"], [0.5]) for b in args.extra_batches]
    for context, batch, granularities, sparsities in runs:
        name_b = name if batch == 1 else f"{name} batch {batch}"
        full_alloc = make_allocation(num_layers, num_kv_heads, 0.0, "kv_head", window)
        try:
            base = measure(model, full_alloc, context, args.decode_steps, device, use_graph, args.repeats, batch, compiled)
        except Exception as e:  # noqa: BLE001 - one failed configuration must not stop the table
            log(f"[{name_b} L={context}] full attention failed: {type(e).__name__}: {e}")
            continue
        log(f"[{name_b} L={context}] full: prefill {base['prefill_s']:.3f}s decode {base['decode_tok_s']:.1f} tok/s "
            f"kv {base['kv_bytes'] / 2**20:.1f} MiB")
        records.append(record(name, "full", 0.0, context, window, base, base, weights))
        if use_graph and args.stock_reference:
            try:
                tok_s = stock_decode(model, context, args.decode_steps, device, batch, compiled)
                references.append({"model": name, "context": context, "batch": batch, "compiled": compiled,
                                   "stock_full_decode_tok_s": tok_s, "consa_full_decode_tok_s": base["decode_tok_s"]})
                log(f"[{name_b} L={context}] stock transformers full attention (StaticCache, SDPA, CUDA graph): "
                    f"{tok_s:.1f} tok/s vs consa full {base['decode_tok_s']:.1f}")
            except Exception as e:  # noqa: BLE001
                log(f"[{name_b} L={context}] stock reference failed: {type(e).__name__}: {e}")
        for granularity in granularities:
            for s in sparsities:
                alloc = make_allocation(num_layers, num_kv_heads, s, granularity, window)
                try:
                    res = measure(model, alloc, context, args.decode_steps, device, use_graph, args.repeats, batch, compiled)
                except Exception as e:  # noqa: BLE001
                    log(f"[{name_b} L={context} {granularity} s={s}] failed: {type(e).__name__}: {e}")
                    continue
                rec = record(name, granularity, s, context, window, res, base, weights)
                records.append(rec)
                log(f"[{name_b} L={context} {granularity} s={s}] kv {rec['kv_bytes_ratio']:.4f} (floor "
                    f"{rec['floor_ratio']:.4f}) prefill x{rec['prefill_speedup']:.2f} decode x{rec['decode_speedup']:.2f} "
                    f"(bound x{rec['decode_bound']:.2f})")


def weight_bytes(model) -> int:
    """Bytes of parameters one decode step reads (tied embeddings once)."""
    return sum(p.numel() * p.element_size() for p in {p.data_ptr(): p for p in model.parameters()}.values())


def record(name, granularity, s, context, window, res, base, weights=0):
    """One table row. decode_bound: the speed-up a step that only streams weights + KV at a fixed
    bandwidth would get, (weights + KV full) / (weights + KV hybrid)."""
    return {"model": name, "granularity": granularity, "sparsity": s, "context": context, "batch": res["batch"],
            "window": window, "decode_bound": (weights + base["kv_bytes"]) / (weights + res["kv_bytes"]),
            "weight_bytes": weights,
            "kv_bytes_ratio": res["kv_bytes"] / base["kv_bytes"], "floor_ratio": floor_ratio(s, window, context),
            "prefill_speedup": base["prefill_s"] / res["prefill_s"], "decode_speedup": res["decode_tok_s"] / base["decode_tok_s"],
            "kv_bytes": res["kv_bytes"], "kv_bytes_full": base["kv_bytes"],
            "kv_bytes_allocated_ratio": res["kv_bytes_allocated"] / base["kv_bytes_allocated"],
            "prefill_s": res["prefill_s"], "prefill_full_s": base["prefill_s"],
            "decode_tok_s": res["decode_tok_s"], "decode_full_tok_s": base["decode_tok_s"], "cuda_graph": res["graph"],
            "compiled_layers": res["compiled"]}


def markdown(records) -> str:
    head = ("| model | batch | granularity | s | context | KV bytes / full | floor | prefill s | prefill × | decode tok/s | decode × "
            "| bound × |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    rows = [f"| {r['model']} | {r['batch']} | {r['granularity']} | {r['sparsity']:.2f} | {r['context']} | {r['kv_bytes_ratio']:.4f} | "
            f"{r['floor_ratio']:.4f} | {r['prefill_s']:.3f} | {r['prefill_speedup']:.2f} | {r['decode_tok_s']:.1f} | "
            f"{r['decode_speedup']:.2f} | {r['decode_bound']:.2f} |" for r in records]
    return head + "\n".join(rows) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--testbed", help="path of the testbed model (12 layers x 4 KV heads); skipped when absent")
    p.add_argument("--out", default="bench/results/current", help="directory for NAME.json and NAME.md")
    p.add_argument("--name", default="runtime", help="file stem of the results")
    p.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    p.add_argument("--granularities", nargs="+", default=["kv_head", "layer"])
    p.add_argument("--decode-steps", type=int, default=128)
    p.add_argument("--extra-batches", type=int, nargs="*", default=[8],
                   help="also run the largest context at these batch sizes (kv_head, s=0.5)")
    p.add_argument("--batch-context", type=int, help="context of the --extra-batches runs (default: the largest)")
    p.add_argument("--repeats", type=int, default=1, help="timed prefills per configuration (best is kept)")
    p.add_argument("--window", type=int, default=1024, help="SWA window of the 0.6B-shaped model")
    p.add_argument("--testbed-window", type=int, default=256, help="SWA window of the testbed model (its search window)")
    p.add_argument("--tiny", action="store_true", help="a tiny random model instead of the 0.6B shape (CPU smoke test)")
    p.add_argument("--skip-qwen", action="store_true")
    p.add_argument("--no-graph", action="store_true", help="decode eagerly even on CUDA")
    p.add_argument("--compile", action="store_true", help="torch.compile the decoder layers for decoding (compile_layers)")
    p.add_argument("--stock-reference", action="store_true",
                   help="also time full attention through stock transformers (StaticCache + SDPA, CUDA graph)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.testbed and not Path(args.testbed, "config.json").is_file():
        p.error(f"--testbed {args.testbed}: no model directory there (carry it to the GPU machine)")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    started = time.time()
    log(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), dtype {dtype}, "
        f"torch {torch.__version__}")

    records, references = [], []
    graph_check = kernel_check = None
    out, stem = Path(args.out), args.name

    def save():  # after each model, so a later failure keeps what was measured
        out.mkdir(parents=True, exist_ok=True)
        meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "dtype": str(dtype),
                "torch": torch.__version__, "decode_steps": args.decode_steps,
                "allocations": "exact_swa_mask on seeded random scores", "baseline": "all-full allocation, same runtime",
                "graph_decode_max_logit_diff": graph_check, "decode_kernel_max_diff": kernel_check,
                "decode_kernel": decode_kernel.available(device, dtype), "compiled_layers": args.compile,
                "seconds": round(time.time() - started, 1)}
        (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "records": records, "stock_reference": references},
                                                     indent=1) + "\n")
        table = markdown(records)
        (out / f"{stem}.md").write_text(table)
        return table

    if device.type == "cuda" and not args.no_graph:
        graph_check = check_graph_decode(device)
    if device.type == "cuda":
        kernel_check = check_decode_kernel(device)
    if not args.skip_qwen:
        name = "tiny-qwen3 (random weights)" if args.tiny else "Qwen3-0.6B shape (random weights)"
        model = random_qwen3(TINY if args.tiny else QWEN3_06B, device, dtype)
        bench_model(name, model, args.window, args, device, records, references)
        save()
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.testbed:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.testbed, dtype=dtype, attn_implementation="sdpa").to(device).eval()
        bench_model(f"testbed {Path(args.testbed).name}", model, args.testbed_window, args, device, records, references)

    table = save()
    log(table)
    log(f"done in {time.time() - started:.0f}s -> {out / (stem + '.json')}")
    return records


if __name__ == "__main__":
    main()
