"""bench/quality.py: seeds in every cell, the default picked over all cells, the per-cell summary."""

import json
import statistics
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def quality(bench_script):
    return bench_script("quality")


def test_every_variant_is_a_valid_search_config(quality):
    from consa.core.config import SearchConfig

    for overrides in quality.VARIANTS.values():
        SearchConfig(model="m", sparsity=0.5, **overrides)


def test_summary_verdicts(quality):
    def rec(method, loss, retrieval, seed=None):
        return {"method": method, "granularity": "layer", "sparsity": 0.5, "loss": loss, "retrieval_acc": retrieval,
                "seed": seed}

    records = [rec("full", 1.0, 0.5) | {"granularity": None, "sparsity": 0.0},
               rec("learned-lm", 1.00, 0.40, 0), rec("learned-lm", 1.02, 0.44, 1),
               rec("duo", 1.10, 0.30, 0), rec("duo", 1.12, 0.46, 1),  # worse loss; retrieval within the noise
               rec("top", 1.01, 0.60)]  # one run: borrows learned-lm's sd
    summary = quality.summarize(records, "lm", [("layer", 0.5), ("kv_head", 0.5)])
    lm = next(c for c in summary["cells"] if c["method"] == "learned-lm")
    assert lm["n"] == 2 and lm["loss"] == pytest.approx(1.01) and lm["loss_std"] == pytest.approx(0.02 ** 0.5 / 10)
    verdicts = {(v["method"], v["metric"]): v["verdict"] for v in summary["verdicts"]}
    assert verdicts == {("duo", "loss"): "win", ("duo", "retrieval_acc"): "tie",
                        ("top", "loss"): "tie", ("top", "retrieval_acc"): "loss"}
    assert summary["all_cells_met"] is False  # a loss, and no kv_head cell
    assert "layer 0.50 vs top: loss tie (1.0100 vs 1.0100, margin" in quality.summary_markdown(summary)


def test_seeds_and_pick_default_end_to_end(quality, tmp_path, tiny_model_dir, text_dir, capsys):
    records = quality.main(["--model", str(tiny_model_dir), "--eval-data", str(text_dir), "--train-data", str(text_dir),
                            "--out", str(tmp_path), "--sparsities", "0.5", "--granularities", "kv_head",
                            "--window", "16", "--seq-len", "160", "--eval-sequences", "2", "--retrieval-docs", "2",
                            "--steps", "2", "--search-seq-len", "64", "--calibration-sequences", "2",
                            "--device", "cpu", "--seeds", "0,1", "--pick-default",
                            "--methods", "full,learned-lm,learned-distill,top,heuristic-loss"])
    seeds = {(r["method"], r.get("seed")) for r in records}
    assert seeds == {("full", None), ("top", None), *((m, s) for m in ("learned-lm", "learned-distill",
                                                                        "heuristic-loss") for s in (0, 1))}
    screen = json.loads((tmp_path / "screen.json").read_text())
    assert set(screen["all_cells"]) == {"lm", "distill"} and screen["all_cells"]["lm"]["runs"] == 2
    winner = screen["default"]
    assert winner in ("lm", "distill") and screen["incumbent"] == "lm"
    assert {r["method"] for r in records if r.get("default")} == {f"learned-{winner}"}

    summary = json.loads((tmp_path / "quality_summary.json").read_text())
    cells = {c["method"]: c for c in summary["cells"]}
    assert set(cells) == {"learned-lm", "learned-distill", "top", "heuristic-loss"}
    assert cells["heuristic-loss"]["n"] == 2 and cells["top"]["n"] == 1
    losses = [r["loss"] for r in records if r["method"] == "heuristic-loss"]
    assert cells["heuristic-loss"]["loss"] == pytest.approx(statistics.fmean(losses))
    assert cells["heuristic-loss"]["loss_std"] == pytest.approx(statistics.stdev(losses))
    assert summary["default"] == f"learned-{winner}" and len(summary["verdicts"]) == 3 * 2
    assert {v["verdict"] for v in summary["verdicts"]} <= {"win", "tie", "loss"}
    assert summary["all_cells_met"] == all(v["verdict"] != "loss" for v in summary["verdicts"])
    assert "## Per cell" in (tmp_path / "quality.md").read_text()

    # Each scored baseline is a job of its own (heuristic-loss per granularity), so workers run them side by side.
    out = capsys.readouterr().out
    assert "done scores heuristic-loss kv_head seed=0" in out and "done scores heuristic-loss kv_head seed=1" in out

    # Resumed with one more variant: only its searches run; the baselines' scores are not computed again.
    resumed = quality.main(["--model", str(tiny_model_dir), "--eval-data", str(text_dir), "--train-data", str(text_dir),
                            "--out", str(tmp_path / "resumed"), "--sparsities", "0.5", "--granularities", "kv_head",
                            "--window", "16", "--seq-len", "160", "--eval-sequences", "2", "--retrieval-docs", "2",
                            "--steps", "2", "--search-seq-len", "64", "--calibration-sequences", "2",
                            "--device", "cpu", "--seeds", "0,1", "--resume", str(tmp_path / "quality.json"),
                            "--methods", "full,learned-lm,learned-lm-wu50,top,heuristic-loss"])
    assert "done scores" not in capsys.readouterr().out
    def same(rs):  # the records of the methods both runs asked for, default flag aside
        return sorted(json.dumps({k: v for k, v in r.items() if k != "default"}, sort_keys=True) for r in rs
                      if r["method"] in ("full", "learned-lm", "top", "heuristic-loss"))

    assert same(resumed) == same(records)
    assert sorted(r["seed"] for r in resumed if r["method"] == "learned-lm-wu50") == [0, 1]


def test_pick_default_keeps_the_incumbent_unless_a_variant_wins_beyond_the_noise(quality):
    def rec(method, g, s, seed, loss, retrieval):
        return {"method": f"learned-{method}", "granularity": g, "sparsity": s, "seed": seed, "loss": loss,
                "retrieval_acc": retrieval}

    full = {"method": "full", "granularity": None, "sparsity": 0.0, "loss": 1.0, "retrieval_acc": 0.5}
    cells = [(g, s, seed) for g in ("layer", "kv_head") for s in (0.25, 0.75) for seed in (0, 1)]
    noisy = [rec("lm", *c, 1.01, 0.40) for c in cells] + \
        [rec("distill", *c, 1.01, 0.40 + (0.05 if i % 2 else -0.04)) for i, c in enumerate(cells)]
    winner, info = quality.pick_default([full, *noisy], {"lm": {}, "distill": {}, "batch2": {}})
    assert info["scores"]["distill"]["score"] > info["scores"]["lm"]["score"]  # higher, but within the noise
    assert winner == "lm" and info["left_out"] == ["batch2"]
    clear = [rec("lm", *c, 1.01, 0.40) for c in cells] + [rec("distill", *c, 1.01, 0.45) for c in cells[:-1]]
    winner, info = quality.pick_default([full, *clear], {"lm": {}, "distill": {}})
    assert winner == "distill" and info["scores"]["distill"]["runs"] == len(cells) - 1  # the cells both finished


def test_report_only_rewrites_the_reports_from_records(quality, tmp_path):
    records = [{"method": "full", "granularity": None, "sparsity": 0.0, "loss": 1.0, "retrieval_acc": 0.5}]
    records += [{"method": f"learned-{m}", "granularity": "layer", "sparsity": 0.5, "seed": seed, "loss": 1.01,
                 "retrieval_acc": 0.4 + 0.01 * seed, "default": m == "distill"} for m in ("lm", "distill") for seed in (0, 1)]
    (tmp_path / "in.json").write_text(json.dumps(records))
    out = quality.main(["--report-only", "--resume", str(tmp_path / "in.json"), "--out", str(tmp_path / "o"),
                        "--variants", "lm,distill", "--pick-default", "--sparsities", "0.5", "--granularities", "layer"])
    assert {r["method"] for r in out if r.get("default")} == {"learned-lm"}  # a tie: the incumbent stays
    summary = json.loads((tmp_path / "o" / "quality_summary.json").read_text())
    assert summary["default"] == "learned-lm" and summary["all_cells_met"] is True
    with pytest.raises(SystemExit):
        quality.main(["--report-only"])


def test_a_cell_with_nothing_to_compare_is_not_met(quality):
    records = [{"method": "learned-lm", "granularity": "layer", "sparsity": 0.5, "seed": s, "loss": 1.0,
                "retrieval_acc": 0.5} for s in (0, 1)]
    assert quality.summarize(records, "lm", [("layer", 0.5)])["all_cells_met"] is False
    records.append({"method": "bottom", "granularity": "layer", "sparsity": 0.5, "loss": 1.2, "retrieval_acc": 0.4})
    assert quality.summarize(records, "lm", [("layer", 0.5)])["all_cells_met"] is True


def test_heldout_re_evaluates_the_recorded_allocations(tmp_path, tiny_model_dir, text_dir, bench_script):
    """bench/heldout.py rebuilds each record's allocation from its pattern and evaluates it elsewhere."""
    heldout = bench_script("heldout")
    layers = json.loads((Path(tiny_model_dir) / "config.json").read_text())["num_hidden_layers"]
    half = ["F" * 2 if i % 2 else "." * 2 for i in range(layers)]
    records = [{"method": "learned-lm", "granularity": "layer", "sparsity": 0.5, "seed": 0, "loss": 1.0,
                "retrieval_acc": 0.5, "pattern": half},
               {"method": "learned-lm", "granularity": "layer", "sparsity": 0.5, "seed": 1, "loss": 1.0,
                "retrieval_acc": 0.5, "pattern": half}]  # not asked for: seed 0 only
    (tmp_path / "q.json").write_text(json.dumps(records))
    out = heldout.main(["--records", str(tmp_path / "q.json"), "--model", str(tiny_model_dir), "--eval-data",
                        str(text_dir), "--sequences", "2", "--docs", "2", "--seq-len", "96", "--window", "16",
                        "--keys", "2", "--cells", "layer:0.5", "--methods", "learned-lm", "--device", "cpu",
                        "--out", str(tmp_path)])
    assert [(r["method"], r.get("seed")) for r in out] == [("full", None), ("learned-lm", 0)]
    assert out[1]["quality_loss"] == 1.0 and out[1]["keys"] == 2 and out[1]["loss"] != out[0]["loss"]
    assert heldout.allocation_of(records[0], 16).sparsity_achieved == 0.5
    assert json.loads((tmp_path / "heldout.json").read_text()) == out


def test_the_held_out_default_never_holds_the_search_text(bench_script, tmp_path):
    """On pyenv/conda layouts site-packages (the search's default text) lies inside the stdlib folder:
    the held-out default must leave it out, and a held-out folder that holds the search's text is refused."""
    corpora = bench_script("corpora")
    held_out = Path(corpora.held_out_text())
    assert not Path(corpora.TRAIN_TEXT).resolve().is_relative_to(held_out.resolve())
    assert (held_out / "argparse.py").is_file() and not any(held_out.rglob("site-packages"))
    (tmp_path / "lib" / "site-packages").mkdir(parents=True)
    with pytest.raises(SystemExit, match="contains the search's text"):
        corpora.check_held_out(tmp_path / "lib", tmp_path / "lib" / "site-packages")
    corpora.check_held_out(tmp_path / "lib", tmp_path / "lib")  # one folder for both: the caller's choice
