"""bench/search_scale.py on the CPU (its `tiny` shape): the records a GPU run will write, with the
checkpointing plan each search step ran under, so a device call is not spent finding a bench bug."""

import json

import pytest

pytestmark = pytest.mark.slow  # live servers or CLI subprocesses: out of the fast loop (pytest -m 'not slow'); CI runs it


@pytest.fixture(scope="module")
def search_scale(bench_script):
    return bench_script("search_scale")


@pytest.mark.slow
def test_scale_records_name_the_plan_they_ran_under(search_scale, tmp_path):
    search_scale.main(["--shapes", "tiny", "--contexts", "128", "--checkpointing", "auto,on,on+nokeep",
                       "--budget", "5", "--device", "cpu", "--out", str(tmp_path), "--name", "scale.json"])
    records = json.loads((tmp_path / "scale.json").read_text())
    fields = {"shape", "context", "gpus", "step_s", "plain_step_s", "ratio", "tokens_per_s", "peak_gib", "mfu",
              "ok", "error"}
    assert [r["checkpointing"] for r in records] == ["auto", "on", "on+nokeep"]
    for r in records:
        assert fields <= set(r) and r["ok"] and r["error"] is None, r
        assert r["ratio"] == pytest.approx(r["step_s"] / r["plain_step_s"], rel=0.01)
        assert r["tokens_per_s"] == pytest.approx(r["context"] / r["step_s"], rel=0.01)
    # The CPU's free memory is unknown: auto checkpoints nothing; on checkpoints both layers, keeping the
    # attention outputs unless told not to.
    plans = [(r["checkpointed_layers"], r["keeps_attention"]) for r in records]
    assert plans == [(0, False), (2, True), (2, False)]


def test_kernel_and_objective_variants_are_recorded(search_scale, tmp_path):
    search_scale.main(["--shapes", "tiny", "--contexts", "128", "--kernels", "off,auto", "--objective", "distill",
                       "--budget", "5", "--device", "cpu", "--out", str(tmp_path), "--name", "scale.json"])
    records = json.loads((tmp_path / "scale.json").read_text())
    assert [(r["kernels"], r["objective"], r["ok"]) for r in records] == [("off", "distill", True), ("auto", "distill", True)]
    assert all(r["fused_kernels"] == [] for r in records)  # no GPU: nothing fused, whatever was asked


def test_saved_mode_holds_the_estimate_to_what_autograd_keeps(search_scale, tmp_path):
    records = search_scale.main(["--mode", "saved", "--shapes", "tiny", "--contexts", "256,512", "--kernels", "off,auto",
                                 "--out", str(tmp_path)])
    assert [(r["context"], r["kernels"]) for r in records] == [(256, "off"), (256, "auto"), (512, "off"), (512, "auto")]
    for r in records:
        assert 0.8 <= r["measured_over_estimate"] <= 1.2, r
    assert records[1]["gate_grad_rel_l2_vs_first"] == 0.0  # CPU: the same code both times
    assert records[1]["gate_grad_cosine_vs_first"] == pytest.approx(1.0)
    assert json.loads((tmp_path / "search_scale_saved.json").read_text()) == records


def test_rounding_mode_compares_float32_and_bfloat16_gradients(search_scale, tmp_path):
    records = search_scale.main(["--mode", "rounding", "--shapes", "tiny", "--contexts", "256", "--device", "cpu",
                                 "--out", str(tmp_path)])
    (rec,) = records
    assert rec["gate_grad_norm_fp32"] > 0  # the window (64) is shorter than the context: the gates matter
    assert 0 < rec["bf16_rel_l2_vs_fp32"] < 1 and -1 <= rec["bf16_cosine_vs_fp32"] <= 1
    assert json.loads((tmp_path / "search_scale_rounding.json").read_text()) == records
