"""A picture of an allocation: layers (rows) x KV heads (columns), full attention vs sliding window.

Cells are shaded by the learned gate probability P(full) when the allocation has one, and by the
hard assignment otherwise; each cell is labelled FA or SWA so the hard decision stays readable.
"""

from pathlib import Path


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("the heatmap needs matplotlib: pip install 'consa[plot]'") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def heatmap_title(allocation) -> str:
    return (f"{allocation.method} · {allocation.granularity} · sparsity {allocation.sparsity_achieved:.2f} "
            f"(window {allocation.window})")


def save_heatmap(allocation, path, title: str | None = None) -> Path:
    """Write a PNG of the allocation to `path` and return the path."""
    plt = _pyplot()
    full = allocation.full_mask().float()  # (L, K), 1 = full
    shade = full if allocation.gate_prob_full is None else full.new_tensor(allocation.gate_prob_full)
    num_layers, num_kv_heads = full.shape

    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * num_kv_heads, 1.2 + 0.32 * num_layers), dpi=110)
    im = ax.imshow(shade.numpy(), cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto", origin="lower")
    if num_layers * num_kv_heads <= 1024:  # labels would be unreadable on very large grids
        for layer in range(num_layers):
            for h in range(num_kv_heads):
                is_full = bool(full[layer, h])
                if is_full:  # outline FA cells: the hard decision must read even where P(full) is near 0.5
                    ax.add_patch(plt.Rectangle((h - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="black", lw=1.2))
                ax.text(h, layer, "FA" if is_full else "SWA", ha="center", va="center", fontsize=6,
                        color="white" if shade[layer, h] > 0.5 else "black", fontweight="bold" if is_full else None)
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer (0 = bottom)")
    ax.set_xticks(range(num_kv_heads))
    ax.set_yticks(range(0, num_layers, max(1, num_layers // 16)))
    ax.set_title(title or heatmap_title(allocation), fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.08, label="P(full)" if allocation.gate_prob_full is not None else "full")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # "tight" grows the canvas to what is drawn: on a narrow grid (few KV heads) the title is wider than the axes.
    fig.savefig(path, format="png", bbox_inches="tight")
    plt.close(fig)
    return path
