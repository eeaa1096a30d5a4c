"""The sliding-window rule, the one definition every SWA mask and kernel in consa uses.

A query at position q sees the key at position k when k is not in its future and either k is one
of the last `window` positions up to q (q itself and the W - 1 before it, transformers'
sliding_window_overlay convention) or k is one of the first `sinks` positions of the sequence.
"""


def swa_visible(q_pos, k_pos, window: int, sinks: int = 0):
    """Elementwise (ints or broadcasting tensors): does a query at q_pos see the key at k_pos under SWA?"""
    return (k_pos <= q_pos) & ((k_pos > q_pos - window) | (k_pos < sinks))
