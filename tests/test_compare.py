import json

import torch

import tiny
from consa.evaluation.baselines import build_baseline
from consa.evaluation.compare import compare, markdown_table
from consa.evaluation.heatmap import save_heatmap

PNG = b"\x89PNG\r\n\x1a\n"


def test_heatmap_png_is_written(tmp_path):
    a = build_baseline("interleave-1:1", (12, 4), 0.5, "kv_head", 256)
    a.gate_prob_full = torch.rand(12, 4).tolist()  # shaded by probability, as a learned allocation
    path = save_heatmap(a, tmp_path / "sub" / "alloc.png")
    data = path.read_bytes()
    assert data[:8] == PNG and len(data) > 2000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 100 and height > 200  # taller than wide: 12 layers x 4 heads


def test_compare_writes_table_and_heatmaps(tmp_path, text_dir, tokenizer):
    model = tiny.build_model()
    allocations = {"full": None, "bottom/half": build_baseline("bottom", (4, 2), 0.5, "layer", 16),
                   "even": build_baseline("even", (4, 2), 0.5, "kv_head", 16)}
    records = compare(model, tokenizer, allocations, data=text_dir, seq_len=160, num_sequences=2,
                      retrieval_docs=2, out_dir=tmp_path, progress=None)
    assert [r["name"] for r in records] == ["full", "bottom/half", "even"]
    assert records[0]["method"] == "full" and records[0]["kv_bytes_ratio"] == 1.0
    assert records[1]["kv_bytes_ratio"] < 1.0 and "loss_pos_ge_window" in records[0]
    assert (tmp_path / "bottom_half.png").read_bytes()[:8] == PNG and (tmp_path / "even.png").exists()
    json.dumps(records)  # JSON-able as `consa eval` / `consa compare` print it
    table = markdown_table(records)
    assert table.count("\n") == 2 + len(records) and "| bottom/half | bottom | layer | 0.50 |" in table


def test_markdown_table_shows_spread():
    table = markdown_table([{"method": "random", "sparsity": 0.5, "loss": 2.0, "loss_std": 0.01, "retrieval_acc": None}])
    assert "2.0000 ± 0.0100" in table and "–" in table


def test_quality_benchmark_runs_end_to_end(tmp_path, tiny_model_dir, text_dir, bench_script):
    quality = bench_script("quality")
    records = quality.main(["--model", str(tiny_model_dir), "--eval-data", str(text_dir), "--train-data", str(text_dir),
                            "--out", str(tmp_path), "--sparsities", "0.5", "--window", "16", "--seq-len", "160",
                            "--eval-sequences", "2", "--retrieval-docs", "2", "--steps", "2", "--search-seq-len", "64",
                            "--calibration-sequences", "2", "--random-seeds", "2", "--device", "cpu", "--pack",
                            "--methods", "full,learned-lm,learned-distill,top,even,random,heuristic-loss"])
    methods = {(r["method"], r["granularity"]) for r in records}
    assert ("full", None) in methods and ("learned-distill", "kv_head") in methods and ("even", "kv_head") in methods
    assert ("even", "layer") not in methods and ("heuristic-loss", "layer") in methods
    assert len(records) == 1 + (2 + 2 + 1) + (2 + 3 + 1)
    saved = json.loads((tmp_path / "quality.json").read_text())
    for r in saved:
        assert {"method", "granularity", "sparsity", "loss", "retrieval_acc", "kv_bytes_ratio"} <= set(r)
        assert r["sparsity"] in (0.0, 0.5)
    random = next(r for r in saved if r["method"] == "random")
    assert "loss_std" in random and len(random["runs"]) == 2
    assert "| learned-lm | layer | 0.50 |" in (tmp_path / "quality.md").read_text()
    import tarfile
    with tarfile.open(tmp_path / "heatmaps.tar.gz") as tar:
        assert len(tar.getnames()) == 2 + 2 + 2 + 3  # every non-random allocation has a heatmap
