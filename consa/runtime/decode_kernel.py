"""One decode step of a hybrid layer's attention in two kernel launches (Triton).

Decoding at batch 1 is bound by reading the KV cache, but only if the reads are spread over the
whole GPU: one program per KV head leaves most of an H200's 132 SMs idle on a 32k context, and an
FA head then takes as long as it would in full attention. So the first kernel splits every head's
tokens into chunks (flash-decoding) and runs one program per (chunk, batch row, KV head) over FA
and SWA heads alike; an SWA head owns only W + sinks tokens, so its programs past that exit at
once and the work left is proportional to the tokens held. The program whose chunk holds the new
token's slot (FA: its position; SWA: its ring slot) stores its K/V there and folds that row in from
registers after the loop, so no other launch touches the cache and the tiles go straight from
memory into the dot products (patching the row into every tile was 12-30% slower). The
second kernel merges the chunks of each query head by their log-sum-exp.

Nothing depends on a host-side length: the position comes from a device tensor, so both launches
can be captured once in a CUDA graph and replayed every step. A GQA group's query heads share one
program, so each K/V byte is read once. float32 inputs multiply in TF32 on the GPU (Triton's
default), as cuBLAS does with TF32 allowed. Measured on an H200: bench/RESULTS.md.
"""

import math
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU wheel of torch comes without Triton; the runtime then uses plain matmuls
    triton = None


def available(device: torch.device, dtype: torch.dtype = torch.float32) -> bool:
    """Whether the fused kernel can run: Triton on a CUDA device, or Triton's CPU interpreter (set
    TRITON_INTERPRET=1 before importing consa; its bfloat16 products are wrong, so float32/16 only)."""
    if triton is None or os.environ.get("CONSA_DECODE_KERNEL", "1") == "0":
        return False
    if device.type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET") == "1" and dtype != torch.bfloat16


BLOCK_N = 64  # tokens per tile: a (64 x 128) bf16 K tile is 16 KiB
PROGRAMS_PER_SM = 4  # enough programs in flight to keep HBM busy
MIN_CHUNK = 256  # below this, merging the chunks costs more than the parallelism brings


def chunk_size(batch: int, long_heads: int, capacity: int, device: torch.device, block: int = BLOCK_N) -> int:
    """Tokens per program: small enough that the long heads (FA heads, the ones with work past the
    window) of every row fill the GPU several times over, whatever share of the layer they are."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    chunk = math.ceil(capacity * batch * max(1, long_heads) / (PROGRAMS_PER_SM * sms))
    chunk = min(max(MIN_CHUNK, chunk), capacity)
    return math.ceil(chunk / block) * block


def head_codes(full_heads: list[bool], device) -> torch.Tensor:
    """Per KV head: its index among the FA heads (>= 0) or -1 - its index among the SWA heads."""
    codes, n_fa, n_swa = [], 0, 0
    for full in full_heads:
        codes.append(n_fa if full else -1 - n_swa)
        n_fa, n_swa = n_fa + full, n_swa + (not full)
    return torch.tensor(codes, dtype=torch.int32, device=device)


if triton is not None:

    @triton.jit
    def _split_kernel(Q, K_NEW, V_NEW, FK, FV, SK, SV, SWA_POS, POS, CODES, PART_O, PART_LSE,
                      s_qb, s_qh, s_nb, s_nh,
                      s_fb, s_fh, s_ft, s_sb, s_sh, s_st,
                      s_ob, s_oh, s_os, s_og, s_lb, s_lh, s_ls,
                      sinks, window, swa_slots, chunk, scale_log2,
                      G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                      BLOCK: tl.constexpr, HK: tl.constexpr):
        split = tl.program_id(0)
        b = tl.program_id(1) // HK
        h = tl.program_id(1) % HK
        pos = tl.load(POS).to(tl.int32)
        code = tl.load(CODES + h)
        offs_g = tl.arange(0, G_PAD)
        offs_d = tl.arange(0, D_PAD)
        offs_n = tl.arange(0, BLOCK)
        d_ok = offs_d < D
        b64 = b.to(tl.int64)

        # Where this head's tokens live: FA storage grows with the position, the SWA buffer holds the
        # sinks and a ring of the last W tokens, filled in slot order until it wraps.
        if code >= 0:
            k_base = FK + b64 * s_fb + code.to(tl.int64) * s_fh
            v_base = FV + b64 * s_fb + code.to(tl.int64) * s_fh
            s_t = s_ft
            length = pos + 1
            row = pos
        else:
            k_base = SK + b64 * s_sb + (-1 - code).to(tl.int64) * s_sh
            v_base = SV + b64 * s_sb + (-1 - code).to(tl.int64) * s_sh
            s_t = s_st
            length = tl.minimum(pos + 1, swa_slots)
            row = tl.where(pos < sinks, pos, (pos - sinks) % window + sinks)

        start = split * chunk
        end = tl.minimum(start + chunk, length)

        # The new token: stored by the program whose chunk holds its slot, and folded in from registers
        # after the loop, so the tiles go from memory straight into the dot products.
        mine = (row >= start) & (row < end)
        k_new = tl.load(K_NEW + b64 * s_nb + h * s_nh + offs_d, mask=d_ok, other=0.0)
        v_new = tl.load(V_NEW + b64 * s_nb + h * s_nh + offs_d, mask=d_ok, other=0.0)
        if mine:
            tl.store(k_base + row.to(tl.int64) * s_t + offs_d, k_new, mask=d_ok)
            tl.store(v_base + row.to(tl.int64) * s_t + offs_d, v_new, mask=d_ok)
            if code < 0:  # every SWA program of this slot writes the same position: a benign race
                tl.store(SWA_POS + row, pos.to(tl.int64))

        q = tl.load(Q + b64 * s_qb + (h * G + offs_g)[:, None] * s_qh + offs_d[None, :],
                    mask=(offs_g[:, None] < G) & d_ok[None, :], other=0.0)
        m = tl.full([G_PAD], float("-inf"), tl.float32)
        l = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D_PAD], tl.float32)
        for n0 in range(start, end, BLOCK):
            n = n0 + offs_n
            ok = (n < end) & (n != row)
            ptr = n.to(tl.int64)[:, None] * s_t + offs_d[None, :]
            k = tl.load(k_base + ptr, mask=ok[:, None] & d_ok[None, :], other=0.0)
            v = tl.load(v_base + ptr, mask=ok[:, None] & d_ok[None, :], other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale_log2  # (G_PAD, BLOCK), log2 units
            s = tl.where(ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a tile holding only the new row
            alpha = tl.exp2(m - m_use)
            p = tl.exp2(s - m_use[:, None])
            l = l * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        if mine:
            s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * scale_log2  # (G_PAD,)
            m_new = tl.maximum(m, s_new)
            alpha = tl.exp2(m - m_new)
            p_new = tl.exp2(s_new - m_new)
            l = l * alpha + p_new
            acc = acc * alpha[:, None] + p_new[:, None] * v_new.to(tl.float32)[None, :]
            m = m_new

        # An empty chunk (past this head's tokens) leaves weight 0 for the merge.
        has = l > 0
        out = tl.where(has[:, None], acc / tl.where(has, l, 1.0)[:, None], 0.0)
        lse = tl.where(has, m + tl.log2(tl.where(has, l, 1.0)), float("-inf"))
        g_ok = offs_g < G
        tl.store(PART_O + b64 * s_ob + h * s_oh + split * s_os + offs_g[:, None] * s_og + offs_d[None, :], out,
                 mask=g_ok[:, None] & d_ok[None, :])
        tl.store(PART_LSE + b64 * s_lb + h * s_lh + split * s_ls + offs_g, lse, mask=g_ok)

    @triton.jit
    def _merge_kernel(PART_O, PART_LSE, OUT, s_ob, s_oh, s_os, s_og, s_lb, s_lh, s_ls, s_yb, s_yh, splits,
                      G: tl.constexpr, HK: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, S_PAD: tl.constexpr):
        b = tl.program_id(0) // (HK * G)
        hq = tl.program_id(0) % (HK * G)
        h = hq // G
        g = hq % G
        offs_s = tl.arange(0, S_PAD)
        offs_d = tl.arange(0, D_PAD)
        s_ok = offs_s < splits
        lse = tl.load(PART_LSE + b * s_lb + h * s_lh + offs_s * s_ls + g, mask=s_ok, other=float("-inf"))
        w = tl.exp2(lse - tl.max(lse, 0))
        w = w / tl.sum(w, 0)
        o = tl.load(PART_O + b * s_ob + h * s_oh + offs_s[:, None] * s_os + g * s_og + offs_d[None, :],
                    mask=s_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        y = tl.sum(o * w[:, None], 0)
        tl.store(OUT + b * s_yb + hq * s_yh + offs_d, y.to(OUT.dtype.element_ty), mask=offs_d < D)


def _pad(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(n))


def decode_step(q, k_new, v_new, fa_k, fa_v, swa_k, swa_v, swa_pos, position, codes, window: int, sinks: int,
                scale: float | None = None, chunk: int | None = None, block: int = BLOCK_N, warps: int = 4,
                stages: int = 2):
    """Attention of one new token per batch row over a hybrid layer's cache, storing its K/V first.

    q (B, Hq, d); k_new/v_new (B, Hk, d); fa_k/fa_v (B, n_fa, C, d); swa_k/swa_v (B, n_swa, sinks + W, d);
    position (1,) long on the device: the new token's position (everything before it is cached);
    swa_pos (sinks + W,) long: the position held by each SWA slot (updated too);
    codes: `head_codes` of the layer. Returns (B, Hq, d) in q's dtype.
    """
    if k_new.stride() != v_new.stride() or fa_k.stride() != fa_v.stride() or swa_k.stride() != swa_v.stride():
        raise ValueError("decode_step needs K and V laid out alike")
    if q.stride(-1) != 1 or k_new.stride(-1) != 1 or fa_k.stride(-1) != 1 or swa_k.stride(-1) != 1:
        raise ValueError("decode_step needs the head dimension contiguous")
    B, Hq, d = q.shape
    Hk = k_new.shape[1]
    G = Hq // Hk
    capacity = max(fa_k.shape[2], swa_k.shape[2])
    long_heads = fa_k.shape[1] if fa_k.numel() else swa_k.shape[1]
    chunk = chunk or chunk_size(B, long_heads, capacity, q.device, block)
    splits = math.ceil(capacity / chunk)
    part_o = torch.empty(B, Hk, splits, G, d, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(B, Hk, splits, G, dtype=torch.float32, device=q.device)
    out = torch.empty(B, Hq, d, dtype=q.dtype, device=q.device)
    scale = scale if scale is not None else d ** -0.5
    # Empty parts (a layer with no FA or no SWA heads) still need a pointer of the right type.
    fa_k = fa_k if fa_k.numel() else k_new.new_empty(1, 1, 1, d)
    fa_v = fa_v if fa_v.numel() else fa_k
    swa_k = swa_k if swa_k.numel() else k_new.new_empty(1, 1, 1, d)
    swa_v = swa_v if swa_v.numel() else swa_k
    swa_pos = swa_pos if swa_pos is not None and swa_pos.numel() else position.new_empty(1)
    _split_kernel[(splits, B * Hk)](
        q, k_new, v_new, fa_k, fa_v, swa_k, swa_v, swa_pos, position, codes, part_o, part_lse,
        q.stride(0), q.stride(1), k_new.stride(0), k_new.stride(1),
        fa_k.stride(0), fa_k.stride(1), fa_k.stride(2), swa_k.stride(0), swa_k.stride(1), swa_k.stride(2),
        part_o.stride(0), part_o.stride(1), part_o.stride(2), part_o.stride(3),
        part_lse.stride(0), part_lse.stride(1), part_lse.stride(2),
        sinks, max(window, 1), swa_k.shape[2], chunk, scale * 1.4426950408889634,
        G=G, G_PAD=_pad(G), D=d, D_PAD=_pad(d), BLOCK=block, HK=Hk, num_warps=warps, num_stages=stages)
    _merge_kernel[(B * Hq,)](
        part_o, part_lse, out, part_o.stride(0), part_o.stride(1), part_o.stride(2), part_o.stride(3),
        part_lse.stride(0), part_lse.stride(1), part_lse.stride(2), out.stride(0), out.stride(1), splits,
        G=G, HK=Hk, D=d, D_PAD=_pad(d, 1), S_PAD=_pad(splits, 1), num_warps=4)
    return out
