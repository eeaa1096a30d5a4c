"""Run several allocations on the same data and tabulate them: `consa compare`, a job's evaluation
and the quality benchmark all go through here."""

import re
from pathlib import Path

import torch

from consa.core.errors import Cancelled
from consa.evaluation.metrics import EvalSet, build_eval_set, evaluate

# Columns of the markdown table: (record key, header, format)
TABLE_COLUMNS = (
    ("name", "allocation", "{}"),
    ("method", "method", "{}"),
    ("granularity", "granularity", "{}"),
    ("sparsity", "sparsity", "{:.2f}"),
    ("loss", "loss", "{:.4f}"),
    ("loss_pos_ge_window", "loss ≥W", "{:.4f}"),
    ("retrieval_acc", "retrieval", "{:.3f}"),
    ("ruler_average", "RULER", "{:.1f}"),
    ("kv_bytes_ratio", "KV ratio", "{:.3f}"),
)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "allocation"


def compare(model, tokenizer, allocations: dict, *, data, seq_len: int = 4096, num_sequences: int = 16,
            retrieval_docs: int = 100, seed: int = 0, window: int | None = None, batch_size: int = 8,
            out_dir=None, progress=print, should_cancel=None, on_part=None) -> list[dict]:
    """Evaluate each allocation (name -> Allocation, or None for the unmodified model) on one EvalSet.
    on_part(name, part) after each part of the eval set ("loss", "retrieval", "ruler": metrics.eval_parts)
    of each allocation; should_cancel() is asked between them (Cancelled).

    Returns one record per allocation: {"name", "method", "granularity", "sparsity", **evaluate(...)};
    with `out_dir`, writes `<name>.png` heatmaps there (and `heatmap` in the record).
    """
    eval_set = data if isinstance(data, EvalSet) else build_eval_set(
        tokenizer, data, seq_len=seq_len, num_sequences=num_sequences, retrieval_docs=retrieval_docs, seed=seed)
    if window is None:  # the unmodified model's loss split uses the allocations' window
        window = next((a.window for a in allocations.values() if a is not None), None)
    records = []
    for name, allocation in allocations.items():
        result = evaluate(model, tokenizer, allocation, data=eval_set, window=window, batch_size=batch_size,
                          should_cancel=should_cancel,
                          on_part=None if on_part is None else lambda part, name=name: on_part(name, part))
        record = {"name": name,
                  "method": allocation.method if allocation is not None else "full",
                  "granularity": allocation.granularity if allocation is not None else None,
                  **result}
        if out_dir is not None and allocation is not None:
            from consa.evaluation.heatmap import save_heatmap

            record["heatmap"] = str(save_heatmap(allocation, Path(out_dir) / f"{_slug(name)}.png"))
        records.append(record)
        if progress is not None:
            progress(f"{name}: loss {result['loss']:.4f} retrieval {result['retrieval_acc']} "
                     f"kv {result['kv_bytes_ratio']:.3f} ({result['seconds']:.1f}s)")
    return records


def baseline_allocations(names, model, tokenizer, *, sparsity: float, granularity: str, window: int,
                         sink_tokens: int = 0, seed: int = 0, calibration_data=None, seq_len: int = 1024,
                         model_name: str = "", steps: int | None = None, on_event=None, should_cancel=None,
                         on_built=None) -> dict:
    """name -> Allocation for each baseline in `names`, all at exactly the same sparsity as the others.
    `steps`: the training steps of a baseline that trains (duo; default: its own). on_built(name) after
    each; should_cancel() is asked before each and inside those that score the model (Cancelled).

    Baselines that look at the model (heuristic-loss) score it on a few `calibration_data` rows: a text
    path or an (N, T) token tensor.
    """
    from consa.evaluation import baselines
    from consa.core.data import calibration_rows
    from consa.model.hybrid_attention import model_shape

    shape = model_shape(model)
    calibration = None
    if any(baselines.needs_calibration(name) for name in names):
        if calibration_data is None:
            raise ValueError("these baselines score the model on calibration data: give calibration_data")
        calibration = calibration_data if isinstance(calibration_data, torch.Tensor) else \
            calibration_rows(tokenizer, calibration_data, seq_len, seed)
        calibration = calibration.to(next(model.parameters()).device)
        if on_event is not None:
            on_event("info", f"baselines that score the model use {calibration.shape[0]} calibration rows of "
                             f"{calibration.shape[1]} tokens")
    built = {}
    for name in names:
        if should_cancel is not None and should_cancel():
            raise Cancelled(f"cancelled before the {name} baseline")
        built[name] = baselines.build_baseline(name, shape, sparsity, granularity, window, seed=seed,
                                               sink_tokens=sink_tokens, model_name=model_name, model=model,
                                               calibration=calibration, tokenizer=tokenizer, steps=steps,
                                               should_cancel=should_cancel)
        if on_built is not None:
            on_built(name)
    return built


def _cell(value, fmt: str, std=None) -> str:
    if value is None:
        return "–"
    text = fmt.format(value) if not isinstance(value, str) else value
    return f"{text} ± {fmt.format(std)}" if std is not None else text


def markdown_table(records: list[dict], columns=TABLE_COLUMNS) -> str:
    """A markdown table of records; a `<key>_std` field is shown as `mean ± std`."""
    columns = [c for c in columns if any(c[0] in r for r in records)]
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for r in records:
        lines.append("| " + " | ".join(_cell(r.get(k), fmt, r.get(f"{k}_std")) for k, _, fmt in columns) + " |")
    return "\n".join(lines) + "\n"
