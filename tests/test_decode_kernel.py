"""The fused decode kernel against plain attention over the tokens each head holds (Triton's CPU
interpreter here; the same kernel runs compiled on the GPU)."""

import pytest
import torch

from consa.runtime import decode_kernel as dk

pytestmark = pytest.mark.skipif(not dk.available(torch.device("cpu")) and not torch.cuda.is_available(),
                                reason="needs Triton")


def reference(q, fa_k, fa_v, swa_k, swa_v, full_heads, position, window, sinks, scale):
    """Softmax attention of q (B, Hq, d) over FA heads' positions 0..position and SWA heads' held slots."""
    B, Hq, d = q.shape
    Hk = len(full_heads)
    G = Hq // Hk
    out = torch.empty_like(q)
    fa_i = swa_i = 0
    for h, full in enumerate(full_heads):
        if full:
            k, v = fa_k[:, fa_i, :position + 1], fa_v[:, fa_i, :position + 1]
            fa_i += 1
        else:
            held = min(position + 1, sinks + window)
            k, v = swa_k[:, swa_i, :held], swa_v[:, swa_i, :held]
            swa_i += 1
        qh = q[:, h * G:(h + 1) * G]  # (B, G, d)
        w = (qh @ k.transpose(1, 2) * scale).softmax(-1)
        out[:, h * G:(h + 1) * G] = w @ v
    return out


@pytest.mark.parametrize("position,sinks,chunk", [(0, 0, None), (37, 0, 64), (200, 4, 128), (300, 0, None), (319, 2, 64)])
def test_decode_step_matches_reference_and_writes_the_cache(position, sinks, chunk):
    torch.manual_seed(position)
    B, Hk, G, d, window, capacity = 2, 4, 3, 24, 32, 320
    full_heads = [True, False, False, True]
    n_fa, n_swa = sum(full_heads), Hk - sum(full_heads)
    q = torch.randn(B, Hk * G, d)
    k_new, v_new = torch.randn(B, Hk, d), torch.randn(B, Hk, d)
    fa_k, fa_v = torch.randn(B, n_fa, capacity, d), torch.randn(B, n_fa, capacity, d)
    swa_k, swa_v = torch.randn(B, n_swa, sinks + window, d), torch.randn(B, n_swa, sinks + window, d)
    swa_pos = torch.full((sinks + window,), -1, dtype=torch.long)
    slot = position if position < sinks else (position - sinks) % window + sinks

    # What the cache must hold after the step: the new token at its FA position and its SWA slot.
    want_fa_k, want_fa_v, want_swa_k, want_swa_v = fa_k.clone(), fa_v.clone(), swa_k.clone(), swa_v.clone()
    fa_sel = [h for h, f in enumerate(full_heads) if f]
    swa_sel = [h for h, f in enumerate(full_heads) if not f]
    want_fa_k[:, :, position], want_fa_v[:, :, position] = k_new[:, fa_sel], v_new[:, fa_sel]
    want_swa_k[:, :, slot], want_swa_v[:, :, slot] = k_new[:, swa_sel], v_new[:, swa_sel]
    scale = d ** -0.5
    want = reference(q, want_fa_k, want_fa_v, want_swa_k, want_swa_v, full_heads, position, window, sinks, scale)

    out = dk.decode_step(q, k_new, v_new, fa_k, fa_v, swa_k, swa_v, swa_pos, torch.tensor([position]),
                         dk.head_codes(full_heads, "cpu"), window, sinks, chunk=chunk, block=16)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-4)
    for got, exp in ((fa_k, want_fa_k), (fa_v, want_fa_v), (swa_k, want_swa_k), (swa_v, want_swa_v)):
        assert torch.equal(got, exp)
    assert swa_pos[slot] == position and int((swa_pos >= 0).sum()) == 1


def test_layers_with_one_kind_of_head():
    torch.manual_seed(0)
    B, d, window = 1, 16, 16
    q, k_new, v_new = torch.randn(B, 4, d), torch.randn(B, 2, d), torch.randn(B, 2, d)
    position = torch.tensor([40])
    empty = torch.empty(B, 0, 64, d)
    fa_k, fa_v = torch.randn(B, 2, 64, d), torch.randn(B, 2, 64, d)
    all_fa = dk.decode_step(q, k_new, v_new, fa_k, fa_v, empty, empty, None, position,
                            dk.head_codes([True, True], "cpu"), window, 0)
    swa_k, swa_v = torch.randn(B, 2, window, d), torch.randn(B, 2, window, d)
    all_swa = dk.decode_step(q, k_new, v_new, empty, empty, swa_k, swa_v, torch.full((window,), -1), position,
                             dk.head_codes([False, False], "cpu"), window, 0)
    torch.testing.assert_close(all_fa, reference(q, fa_k, fa_v, None, None, [True, True], 40, window, 0, d ** -0.5))
    torch.testing.assert_close(all_swa, reference(q, None, None, swa_k, swa_v, [False, False], 40, window, 0, d ** -0.5))


def test_chunks_spread_the_long_heads_over_the_gpu():
    cpu = torch.device("cpu")  # counts as one SM: PROGRAMS_PER_SM programs
    assert dk.chunk_size(1, 1, 32768, cpu) == 32768 // dk.PROGRAMS_PER_SM
    assert dk.chunk_size(1, 2, 32768, cpu) == 2 * 32768 // dk.PROGRAMS_PER_SM  # twice the heads, twice the chunk
    assert dk.chunk_size(1, 1, 100, cpu) == 128  # one chunk covers a short cache (in whole tiles)
    assert dk.chunk_size(64, 8, 1024, cpu) == 1024


def test_head_codes():
    assert dk.head_codes([True, False, True, False, False], "cpu").tolist() == [0, -1, 1, -2, -3]
