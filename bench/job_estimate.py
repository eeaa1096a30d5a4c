"""How good is the job estimate (service/estimate.py)? Runs real searches (and, with --evaluate, the job's
evaluation) on this machine's device and sets the measured seconds beside the estimate; prints the CPU
throughput the measurement implies (service/estimate.py's CPU_FLOPS comes from it).

    python bench/job_estimate.py --model /work/shared/models/qwen3-code-26m --data /tmp/sp --seq-lens 256,1024
    python bench/job_estimate.py --tiny      # the tests' 4-layer model, built on the fly

Writes bench/results/current/job_estimate.json.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def measure(model: str, data: str, seq_len: int, steps: int, evaluate: bool, device: str) -> dict:
    from consa.core.config import SearchConfig
    from consa.recipe.pipeline import run_allocation
    from service.estimate import estimate, model_shape

    config = SearchConfig(model=model, dataset=data, sparsity=0.5, window=min(256, seq_len // 4), seq_len=seq_len,
                          steps=steps)
    records, phases = [], {}
    last = {"t": time.perf_counter(), "phase": "setup"}

    def progress(record):
        now = time.perf_counter()
        phase = record.get("phase", "search")
        if phase != last["phase"]:
            phases[last["phase"]] = phases.get(last["phase"], 0.0)
            last["phase"] = phase
        if phase == "search":
            records.append(now)
        phases[phase] = phases.get(phase, 0.0) + now - last["t"]
        last["t"] = now

    import tempfile

    out = Path(tempfile.mkdtemp(prefix="consa-bench-estimate-"))  # the run's artifacts: not kept
    start = time.perf_counter()
    run_allocation(config, out, evaluate=evaluate, checkpoint=False, heatmap=False, duo_steps=steps, device=device,
                   progress=progress)
    wall = time.perf_counter() - start
    gaps = [b - a for a, b in zip(records, records[1:])][2:]  # past the first steps' warm-up
    step_s = statistics.median(gaps) if gaps else None
    params = {"model": model, "seq_len": seq_len, "batch_size": config.batch_size, "steps": steps,
              "evaluate": evaluate, "duo_steps": steps, "granularity": config.granularity}
    dev = "cpu" if device == "cpu" else "cuda:" + __import__("torch").cuda.get_device_name(0)
    guess = estimate(params, dev)
    shape = model_shape(model)
    flops = 4 * shape["params"] * seq_len * config.batch_size \
        + 7 * shape["layers"] * seq_len * config.batch_size * seq_len * shape["attention_width"]
    return {"model": model, "params": shape["params"], "layers": shape["layers"], "seq_len": seq_len,
            "steps": steps, "device": dev, "step_s": round(step_s, 4) if step_s else None,
            "implied_flops_per_s": round(flops / step_s) if step_s else None,
            "evaluation_s": round(phases.get("evaluation", 0.0), 1) if evaluate else None,
            "wall_s": round(wall, 1), "estimate": guess}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", action="append", default=[])
    parser.add_argument("--data")
    parser.add_argument("--tiny", action="store_true", help="also the tests' tiny model on their text")
    parser.add_argument("--seq-lens", default="256")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--evaluate", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/current/job_estimate.json")
    args = parser.parse_args()
    runs = []
    models = [(m, args.data) for m in args.model]
    if args.tiny:
        import tiny

        work = Path("/tmp/consa-bench-estimate")
        models.append((str(tiny.save_tiny(work / "tiny-qwen3")), str(tiny.write_text_dir(work / "text"))))
    for model, data in models:
        for seq_len in map(int, args.seq_lens.split(",")):
            runs.append(measure(model, data, seq_len, args.steps, args.evaluate, args.device))
            print(json.dumps(runs[-1]), flush=True)
    record = {"what": "measured search step (and evaluation) time next to service/estimate.py's estimate",
              "command": "python bench/job_estimate.py " + " ".join(sys.argv[1:]),
              "machine": f"{platform.node()} ({platform.machine()}), {os.cpu_count()} cores, "
                         f"load {os.getloadavg()[0]:.1f}", "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
