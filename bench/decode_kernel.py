"""Micro-benchmark of one layer's decode attention: consa's fused Triton kernel (over a sweep of tile
sizes, warps, pipeline stages and chunk lengths) against PyTorch's SDPA and the plain-matmul path.

    python bench/decode_kernel.py --out bench/results/current

Shapes of Qwen3-0.6B (8 KV heads, 16 query heads, head_dim 128, bf16), context 32k, batch 1 and 16,
all heads FA and half of them SWA (W = 1024). Each call is timed from a CUDA graph of 8 calls over 8
different caches (so nothing is served from L2); bandwidth = K/V bytes the heads hold / time.
"""

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from consa.runtime import decode_kernel  # noqa: E402
from consa.runtime.attention_kernels import decode_attention  # noqa: E402
from consa.runtime.kv_accounting import held_bytes, token_bytes  # noqa: E402

HK, G, D, WINDOW = 8, 2, 128, 1024


def timed(fn, layers=8, replays=20):
    """Microseconds per call, from a CUDA graph of `layers` calls."""
    for _ in range(2):
        for i in range(layers):
            fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(layers):
            fn(i)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (replays * layers)


def scenario(batch, context, n_fa, layers=8):
    dev, dt = torch.device("cuda"), torch.bfloat16
    n_swa = HK - n_fa
    caches = [dict(fa_k=torch.randn(batch, n_fa, context, D, device=dev, dtype=dt),
                   fa_v=torch.randn(batch, n_fa, context, D, device=dev, dtype=dt),
                   swa_k=torch.randn(batch, n_swa, WINDOW, D, device=dev, dtype=dt),
                   swa_v=torch.randn(batch, n_swa, WINDOW, D, device=dev, dtype=dt),
                   swa_pos=torch.zeros(WINDOW, dtype=torch.long, device=dev)) for _ in range(layers)]
    q = torch.randn(batch, HK * G, D, device=dev, dtype=dt)
    k_new, v_new = torch.randn(batch, HK, D, device=dev, dtype=dt), torch.randn(batch, HK, D, device=dev, dtype=dt)
    position = torch.tensor([context - 1], device=dev)
    codes = decode_kernel.head_codes([h < n_fa for h in range(HK)], dev)
    held = held_bytes(n_fa, n_swa, context, WINDOW, 0, token_bytes(D, dt.itemsize, batch))  # K and V bytes the heads hold
    return caches, q, k_new, v_new, position, codes, held


def flash_varlen(q, k_store, v_store, used):
    """PyTorch's flash kernel over a static cache with device-side lengths (graph-safe): q (B, Hq, d);
    k/v_store (n, B, C, d), read as (B * C, n, d) packed sequences of C slots, `used` (B,) int32 valid."""
    n, B, C, d = k_store.shape
    k = k_store.permute(1, 2, 0, 3).reshape(B * C, n, d)  # a view: token stride d, head stride B * C * d
    v = v_store.permute(1, 2, 0, 3).reshape(B * C, n, d)
    assert k.data_ptr() == k_store.data_ptr() and k.stride() == (d, B * C * d, 1)
    cu_q = torch.arange(B + 1, dtype=torch.int32, device=q.device)
    cu_k = cu_q * C
    return torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, 1, C, 0.0, False, False,
                                                   seqused_k=used)[0]


def flash_probe(batch, context, n_fa, q_all, add, layers=8):
    """Flash over the FA heads' cache in (heads, batch, slots, d) layout; checked against plain attention."""
    dev, dt = torch.device("cuda"), torch.bfloat16
    capacity = context + 64  # static storage longer than the valid tokens, as in graph decoding
    stores = [(torch.randn(n_fa, batch, capacity, D, device=dev, dtype=dt),
               torch.randn(n_fa, batch, capacity, D, device=dev, dtype=dt)) for _ in range(layers)]
    q = q_all[:, :n_fa * G].contiguous()
    used = torch.full((batch,), context, dtype=torch.int32, device=dev)
    out = flash_varlen(q, *stores[0], used)
    k, v = stores[0][0][:, :, :context].transpose(0, 1).float(), stores[0][1][:, :, :context].transpose(0, 1).float()
    w = (q.float().view(batch, n_fa, G, D) @ k.transpose(-1, -2) * D ** -0.5).softmax(-1)
    err = ((w @ v).view(batch, n_fa * G, D) - out.float()).abs().max().item()
    add(f"torch flash varlen+seqused_k, FA heads only (max err {err:.1e})",
        timed(lambda i: flash_varlen(q, *stores[i], used)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/results/current")
    p.add_argument("--context", type=int, default=32768)
    args = p.parse_args(argv)
    rows = []
    for batch, n_fa in ((1, 8), (1, 4), (16, 8), (16, 4)):
        caches, q, k_new, v_new, position, codes, held = scenario(batch, args.context, n_fa)
        name = f"batch {batch}, {n_fa} FA + {HK - n_fa} SWA heads"

        def add(label, us):
            rows.append({"scenario": name, "batch": batch, "fa_heads": n_fa, "kernel": label, "us": us,
                         "gb_s": held / us / 1e3})
            print(f"{name:32s} {label:44s} {us:8.1f} us {held / us / 1e3:7.0f} GB/s", flush=True)

        for block, warps, stages, chunk in itertools.product((32, 64), (4, 8), (2, 3, 4), (None, 512, 1024, 2048)):
            def fused(i, c=caches):
                decode_kernel.decode_step(q, k_new, v_new, c[i]["fa_k"], c[i]["fa_v"], c[i]["swa_k"], c[i]["swa_v"],
                                          c[i]["swa_pos"], position, codes, WINDOW, 0, chunk=chunk, block=block,
                                          warps=warps, stages=stages)
            try:
                add(f"consa fused block={block} warps={warps} stages={stages} chunk={chunk or 'auto'}", timed(fused))
            except Exception as e:  # noqa: BLE001 - a config that does not fit (shared memory) is skipped
                print(f"{name}: block={block} warps={warps} stages={stages}: {type(e).__name__}", flush=True)
        try:
            flash_probe(batch, args.context, n_fa, q, add)
        except Exception as e:  # noqa: BLE001 - older torch: no seqused_k
            print(f"{name}: flash varlen with seqused_k unavailable: {type(e).__name__}: {e}", flush=True)
        if n_fa == HK:  # the stock kernels, full attention only
            qs = q.unsqueeze(2)

            def sdpa(i, c=caches):
                F.scaled_dot_product_attention(qs, c[i]["fa_k"], c[i]["fa_v"], enable_gqa=True)

            def matmul(i, c=caches):
                decode_attention(qs, c[i]["fa_k"], c[i]["fa_v"])
            add("torch SDPA (enable_gqa)", timed(sdpa))
            add("plain matmul-softmax-matmul (previous runtime)", timed(matmul))
        del caches
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "context": args.context}
    (out / "decode_kernel.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    for name in dict.fromkeys(r["scenario"] for r in rows):
        best = min((r for r in rows if r["scenario"] == name), key=lambda r: r["us"])
        print(f"best for {name}: {best['kernel']} {best['us']:.1f} us {best['gb_s']:.0f} GB/s")


if __name__ == "__main__":
    main()
