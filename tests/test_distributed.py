"""Data-parallel search on CPU with the gloo backend: 2 processes, one search."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from consa.core.config import SearchConfig
from consa.search.distributed import helpers
from consa.model.devices import DataParallel

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")


def _config(model_dir, data_dir, **kw):
    base = dict(model=str(model_dir), sparsity=0.375, granularity="kv_head", window=8, dataset=str(data_dir),
                seq_len=48, steps=8, batch_size=1, num_sequences=16)
    return SearchConfig(**{**base, **kw})


def _join(rank, world_size, port):
    """This spawned process is rank `rank` of `world_size` (run_search joins the group from the environment)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)


def _rank(rank, world_size, port, config_dict, out_dir):
    from consa.search.loop import run_search

    _join(rank, world_size, port)
    result = run_search(SearchConfig.from_dict(config_dict), device="cpu")
    torch.save({"log_alpha": result.gate_state["log_alpha"], "lambda1": result.gate_state["lambda1"],
                "full": result.allocation.full_mask(), "achieved": result.allocation.sparsity_achieved,
                "gpus": result.allocation.training["gpus"], "history": result.history},
               os.path.join(out_dir, f"rank{rank}.pt"))


def test_rows_of_n_ranks_are_the_rows_of_one_process_with_n_times_the_batch():
    order = torch.randperm(20)
    for step in range(3):
        together = DataParallel(0, 1).rows(order, step, 4)
        split = torch.cat([DataParallel(r, 2).rows(order, step, 2) for r in range(2)])
        assert torch.equal(together, split)


@pytest.mark.slow
def test_two_gloo_processes_learn_identical_gates_and_an_exact_allocation(tiny_model_dir, text_dir, tmp_path):
    from consa.search.distributed import _free_port
    from consa.search.loop import run_search

    config = _config(tiny_model_dir, text_dir)
    mp.start_processes(_rank, args=(2, _free_port(), config.to_dict(), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert torch.equal(r0["log_alpha"], r1["log_alpha"])  # every rank applies the same averaged gradient
    assert r0["lambda1"] == r1["lambda1"]
    assert torch.equal(r0["full"], r1["full"])
    assert r0["achieved"] == r1["achieved"] == 0.375  # 3 of 8 units, exactly
    assert r0["gpus"] == 2
    assert len(r0["history"]) == 8 and r1["history"] == []  # rank 0 reports
    assert not torch.allclose(r0["log_alpha"], torch.full((8,), 3.0))  # the gates did learn

    # Same rows per step and same gate noise as one process with twice the batch: same gates to rounding.
    single = run_search(_config(tiny_model_dir, text_dir, batch_size=2))
    assert torch.allclose(single.gate_state["log_alpha"], r0["log_alpha"], atol=1e-4)
    assert torch.equal(single.allocation.full_mask(), r0["full"])


def test_a_worker_runs_rank_zero_itself_with_helper_processes(tiny_model_dir, text_dir):
    from consa.search.loop import run_search

    config = _config(tiny_model_dir, text_dir, steps=4)
    seen = []
    with helpers(config, 2, devices=["cpu", "cpu"]) as device:
        result = run_search(config, device=device, progress=seen.append)
    assert result.allocation.training["gpus"] == 2
    assert result.allocation.sparsity_achieved == 0.375
    assert [r["step"] for r in seen] == [1, 2, 3, 4]
    assert "WORLD_SIZE" not in os.environ or os.environ["WORLD_SIZE"] == "1"


@pytest.mark.parametrize("launch", ["torchrun", "--gpus"])
@pytest.mark.slow
def test_torchrun_search_writes_one_exact_manifest(tiny_model_dir, text_dir, tmp_path, launch):
    out = tmp_path / "run"
    search = ["search", "--model", str(tiny_model_dir), "--sparsity", "0.5", "--data", str(text_dir),
              "--seq-len", "48", "--steps", "3", "--window", "8", "--device", "cpu", "--out", str(out)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "consa",
           *search] if launch == "torchrun" else [sys.executable, "-m", "consa", *search, "--gpus", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sparsity_achieved"] == 0.5 and manifest["training"]["gpus"] == 2
    assert proc.stdout.count('"manifest"') == 1  # only rank 0 reports the outputs


@pytest.mark.parametrize("gpus,message", [("0", "--gpus must be at least 1"), ("2", "this machine has 0 GPU(s)")])
def test_search_gpus_refuses_what_the_machine_cannot_do(tiny_model_dir, text_dir, tmp_path, capsys, gpus, message):
    from consa.cli import main

    if gpus == "2" and __import__("torch").cuda.device_count() >= 2:
        pytest.skip("this machine has the GPUs")
    args = ["search", "--model", str(tiny_model_dir), "--sparsity", "0.5", "--data", str(text_dir),
            "--out", str(tmp_path), "--gpus", gpus]
    assert main(args) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_a_service_worker_owning_two_devices_runs_the_job_over_both(tmp_path, tiny_model_dir, text_dir):
    """CONSA_GPUS_PER_JOB=2: the worker is rank 0 with one helper rank (gloo on CPU here); the job says so."""
    from service_fixtures import Server, server_env, wait_for

    server = Server(server_env(tmp_path / "var", tiny_model_dir, text_dir, gpus_per_job=2), tmp_path / "serve.log")
    server.start()
    try:
        with server.client(server.create_key("alice")) as client:
            job = client.post("/v1/jobs", json={"model": str(tiny_model_dir), "dataset": str(text_dir),
                                                "sparsity": 0.5, "window": 16, "seq_len": 64, "steps": 4}).json()
            done = wait_for(client, job["id"], timeout=240)
            assert done["status"] == "succeeded", done
            manifest = client.get(f"/v1/jobs/{job['id']}/artifacts/manifest.json").json()
            assert manifest["training"]["gpus"] == 2 and manifest["sparsity_achieved"] == 0.5
            events = client.get(f"/v1/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]
            assert any(e["data"] and e["data"].get("gpus") == 2 for e in events), events
    finally:
        server.stop()
