"""A job's time before it runs: search steps x a step time, plus the evaluation's units. Rough by design.

A step's time comes from its FLOPs (the model's shape read from the local model's config.json: no torch in
the API) over a throughput measured per device kind and model size class, never less than a per-layer
floor (small models are launch-bound on a GPU):

    search step   4·P·T (forward + input-gradient backward, frozen weights) + 7·L·T·S·A (causal attention,
                  backward 2.5x forward), T = seq_len x batch_size tokens, S = seq_len, A = heads x head_dim
    forward row   2·P·S + 2·L·S²·A
    warm start    heuristic-loss: (units + 1) x 8 rows; retrieval-heads: 8 rows; duo: 200 steps x 4 rows
    evaluation    heuristic-loss: (units + 1) x 4 rows; retrieval-heads: 4 rows; duo: duo_steps x 4 rows
                  (teacher + student forward, backward); scoring: (full + learned + baselines) x (16 rows +
                  64 retrieval documents, + 4 RULER prompts x 13 tasks at seq_len >= 1024 unless `ruler` is false)

Where the numbers come from (bench/RESULTS.md, "Faults (issue 23)" and "Search at scale"):
- GPU (H100/H200 class, 989 TFLOP/s bf16): MFU 29% at 0.6B, 45% at 1.7B, 52% at 8B (search_scale runs
  7-11: this formula gives 8B/32k 3.83 s vs 3.82 measured, 8B/8k 0.60 vs 0.59, 0.6B/8k 0.18 vs 0.16-0.19, but
  0.6B/32k 1.78 vs 1.15, 1.5x over: a small model's MFU grows with the context);
  floor 6.5 ms per layer (the 26M testbed's 0.060-0.096 s steps, the 0.6B/8k step's CPU time). Other GPUs:
  scaled by their bf16 peak where the name is known, else an A100's.
- CPU: bench/job_estimate.py on the project's shared 2-core box (load ~10 from other sessions), one
  thread (OMP_NUM_THREADS=1, as the tests' workers run): the 26M testbed at seq_len 256 took 1.82 s a step
  (16 GFLOP/s effective; the formula says 1.97 s), the tests' 4-layer model 0.046 s (the floor). With torch's
  default threads on that loaded box the same steps took 22 s and 1.1 s: oversubscribed cores are the worst
  case. A CPU's speed varies 10x between machines and with their load: the estimate is an order of magnitude.
Not counted: loading the model, building the data, the export (seconds to minutes; more for a hub download).
Expect the truth within 0.5x-2x on a GPU of the table, and within 10x on a CPU.
"""

import json
from pathlib import Path

# bf16 dense peak per GPU name (substring match), FLOP/s
GPU_PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40": 181e12, "A10": 125e12, "4090": 165e12,
             "3090": 71e12, "T4": 65e12, "V100": 125e12}
DEFAULT_GPU_PEAK = 312e12
# Model-FLOP utilisation of the search step by model size (parameters), measured on an H200.
GPU_MFU = ((3e8, 0.20), (1e9, 0.29), (3e9, 0.45), (float("inf"), 0.52))
GPU_FLOOR_PER_LAYER_S = 0.0065
# CPU: effective FLOP/s of the search step and a per-layer floor (bench/job_estimate.py; see the docstring).
CPU_FLOPS = 1.5e10
CPU_FLOOR_PER_LAYER_S = 0.01
EVAL_ROWS, EVAL_DOCS, CALIBRATION_ROWS, RULER_PROMPTS = 16, 64, 4, 4 * 13
# A search's warm start scores the model before its first step: consa.search.warm_start.CALIBRATION_ROWS
# rows, and duo.DEFAULT_STEPS training steps of a teacher and a student pass (4 rows' worth). Copied, not
# imported: both modules import torch, which the API does not have.
WARM_START_ROWS, DUO_STEPS = 8, 200
FORWARD_SHARE = 1 / 3  # a forward pass costs about a third of a step (forward + backward)


def model_shape(model: str) -> dict | None:
    """Parameters, layers, KV heads and attention width from a local model's config.json; None when it
    has none (a hub id, a folder without one)."""
    path = Path(model) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    config = config.get("text_config", config)
    try:
        hidden, layers = int(config["hidden_size"]), int(config["num_hidden_layers"])
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or hidden // heads)
        inter = int(config.get("intermediate_size") or 4 * hidden)
        vocab = int(config["vocab_size"])
    except (KeyError, TypeError, ValueError):
        return None
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
    params = layers * (attention + 3 * hidden * inter) + vocab * hidden  # the LM head; embeddings cost no FLOPs
    return {"params": params, "layers": layers, "kv_heads": kv_heads, "attention_width": heads * head_dim}


def size_class(params: int) -> str:
    for bound, name in ((1e8, "under 100M"), (1e9, "100M-1B"), (3e9, "1B-3B"), (1e10, "3B-10B")):
        if params < bound:
            return name
    return "10B and more"


def _throughput(device: str, params: int) -> tuple[float, float]:
    """(effective FLOP/s, floor per layer in s) of a search step on this device kind."""
    if device.startswith("cuda"):
        peak = next((p for name, p in GPU_PEAKS.items() if name in device), DEFAULT_GPU_PEAK)
        mfu = next(m for bound, m in GPU_MFU if params < bound)
        return peak * mfu, GPU_FLOOR_PER_LAYER_S
    return CPU_FLOPS, CPU_FLOOR_PER_LAYER_S


def estimate(params: dict, device: str, *, baselines: int = 10, units_per_layer: int | None = None) -> dict:
    """The estimate of a job (its validated parameters, with `model` resolved) on `device` ("cpu",
    "cuda:NVIDIA H200"); `baselines`: how many the evaluation builds."""
    shape = model_shape(params["model"])
    if shape is None:
        return {"object": "allocation.job.estimate", "device": device, "total_s": None,
                "basis": "no estimate: the model's config.json is not readable here (a hub model, or no config)"}
    P, L, A = shape["params"], shape["layers"], shape["attention_width"]
    S, B, steps = int(params["seq_len"]), int(params["batch_size"]), int(params["steps"])
    flops_per_s, floor = _throughput(device, P)
    T = S * B
    step_s = max(L * floor, (4 * P * T + 7 * L * T * S * A) / flops_per_s)
    row_s = max(L * floor * FORWARD_SHARE, (2 * P * S + 2 * L * S * S * A) / flops_per_s)
    granularity = params.get("granularity", "kv_head")
    units = L * (units_per_layer or (shape["kv_heads"] if granularity != "layer" else 1))
    warm_rows = {"heuristic-loss": (units + 1) * WARM_START_ROWS, "retrieval-heads": WARM_START_ROWS,
                 "duo": DUO_STEPS * 4}.get(params.get("warm_start") or "none", 0)
    out = {"object": "allocation.job.estimate", "device": device, "model_params": P, "size_class": size_class(P),
           "search_steps": steps, "step_s": round(step_s, 4), "search_s": round(steps * step_s + warm_rows * row_s, 1),
           "evaluation_units": 0, "evaluation_s": 0.0}
    if params.get("evaluate"):
        duo_steps = int(params.get("duo_steps") or steps)
        allocations = 2 + baselines
        ruler = params.get("ruler", True) is not False and S >= 1024
        rows = ((units + 1) * CALIBRATION_ROWS + CALIBRATION_ROWS + duo_steps * 4
                + allocations * (EVAL_ROWS + EVAL_DOCS + (RULER_PROMPTS if ruler else 0)))
        parts = 2 + ruler
        out["evaluation_units"] = baselines + allocations * parts
        out["evaluation_s"] = round(rows * row_s, 1)
    out["total_s"] = round(out["search_s"] + out["evaluation_s"], 1)
    out["basis"] = ("search steps x a step time from the model's FLOPs over a throughput measured on this device "
                    "kind (bench/RESULTS.md), plus the evaluation's forward passes; not counted: loading the "
                    "model and data, the export. Rough: expect 0.5x-2x on a GPU, within 10x on a CPU (its load matters)")
    return out
