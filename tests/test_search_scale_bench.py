"""bench/search_scale.py on the CPU (its `tiny` shape): the records a GPU run will write, with the
checkpointing plan each search step ran under, so a device call is not spent finding a bench bug."""

import json

import pytest


@pytest.fixture(scope="module")
def search_scale(bench_script):
    return bench_script("search_scale")


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
    from consa import memory

    assert memory.KEEP_ATTENTION is True  # the bench's +nokeep did not leak into the library's default
