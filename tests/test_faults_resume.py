"""Issue 23, point 1, with real processes: `consa serve`'s Celery worker is killed with SIGKILL after
its search, once during the evaluation and once during the export. The search's state was saved at
step == steps; the requeued attempt must accept it, run no search step again, and succeed.

The tiny model's export lasts a second, so the worker is held at the start of the phase (a marker file
read by tests/fault_hooks/sitecustomize.py, on the server's PYTHONPATH) until the test has killed it.
Settings are shortened (heartbeat 1 s, stale after 4 s, reconcile every 1 s)."""

import os
import signal
import time

import pytest

from service_fixtures import ROOT, fault_record, server_env, serving, the_worker, wait_for, wait_until

pytestmark = pytest.mark.slow  # live servers or CLI subprocesses: out of the fast loop (pytest -m 'not slow'); CI runs it

FAST = dict(worker_heartbeat_s=1, stale_after_s=4, reconcile_interval_s=1, requeue_after_s=3,
            checkpoint_every_steps=5, checkpoint_every_s=0)
STEPS = 12


def test_a_state_saved_at_the_last_step_runs_no_step_and_finalizes_to_the_same_allocation(tiny_model_dir, text_dir):
    from consa.core.config import SearchConfig
    from consa.search.loop import run_search

    config = SearchConfig(model=str(tiny_model_dir), dataset=str(text_dir), sparsity=0.5, window=16, seq_len=64,
                          steps=6, temperature_final=0.2)
    saved = []
    whole = run_search(config, on_checkpoint=saved.append, checkpoint_every=3)
    assert [s["step"] for s in saved] == [3, 6]
    steps = []
    again = run_search(config, resume_from=saved[-1], progress=steps.append)
    assert steps == [] and again.history == []  # not one step
    assert again.allocation.assignment == whole.allocation.assignment
    assert again.allocation.gate_prob_full == whole.allocation.gate_prob_full  # the last step's temperature
    assert again.allocation.training["final_expected_sparsity"] == whole.allocation.training["final_expected_sparsity"]


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_model_dir, text_dir):
    var = tmp_path_factory.mktemp("var-resume-faults")
    env = server_env(var, tiny_model_dir, text_dir, **FAST)
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{ROOT / 'tests' / 'fault_hooks'}"
    env["FAULT_HOLD"] = (f"consa.recipe.pipeline:evaluate_allocation={var / 'hold-evaluation'};"
                         f"consa.export.checkpoint:pack_checkpoint={var / 'hold-export'}")
    with serving(var, env, tiny_model_dir, text_dir) as server:
        yield server


def events(client, job_id: str) -> list[dict]:
    return client.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["evaluation", "export"])
def test_a_worker_killed_after_its_search_does_not_run_the_search_again(srv, phase):
    hold = srv.var / f"hold-{phase}"
    hold.touch()
    try:
        with srv.client(srv.alice) as client:
            job = client.post("/v1/jobs", json={"model": srv.model, "dataset": srv.data, "sparsity": 0.5,
                                                "window": 16, "seq_len": 64, "steps": STEPS, "evaluate": True,
                                                "duo_steps": 2}).json()
            said = "evaluating the allocation" if phase == "evaluation" else "packing the checkpoint"
            wait_until(lambda: any(e["message"].startswith(said) for e in events(client, job["id"])), 180,
                       f"the job is in its {phase}")
            worker = the_worker(srv)
            os.kill(worker, signal.SIGKILL)
            killed = time.monotonic()
            hold.unlink()
            done = wait_for(client, job["id"], timeout=240)
            took = time.monotonic() - killed
            assert done["status"] == "succeeded", done
            log = events(client, job["id"])
    finally:
        hold.unlink(missing_ok=True)
    runs = [i for i, e in enumerate(log) if e["message"].startswith("job running on")]
    assert len(runs) == 2, [e["message"] for e in log]
    first, second = log[runs[0]:runs[1]], log[runs[1]:]
    search_steps = lambda part: [e["data"]["step"] for e in part  # noqa: E731
                                 if e["type"] == "progress" and e["data"].get("phase") == "search"]
    assert search_steps(first)[-1] == STEPS
    assert search_steps(second) == [], search_steps(second)  # the search is not run again
    resumed = [e for e in second if e["message"].startswith("resumed from step")]
    assert len(resumed) == 1 and resumed[0]["data"]["resumed_from_step"] == STEPS, [e["message"] for e in second]
    assert not any("unusable" in e["message"] for e in log)
    names = {a["name"] for a in srv.client(srv.alice).get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]}
    assert {"manifest.json", "evaluation.json", "checkpoint.tar"} <= names, names
    fault_record(f"worker SIGKILLed in the {phase}", succeeded_after_kill_s=round(took, 1),
                 search_steps_repeated=len(search_steps(second)), resumed_from_step=STEPS, steps=STEPS)
