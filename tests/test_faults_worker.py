"""Issue 11, point 3 (and the reconciler of point 2), with real processes: `consa serve`'s Celery worker
is killed with SIGKILL mid-job, or frozen with SIGSTOP while a cancel arrives. Settings are shortened
(heartbeat 1 s, stale after 4 s, reconcile every 1 s) so the test takes seconds, not minutes."""

import os
import signal

import httpx
import pytest

from service_fixtures import server_env, serving, the_worker, wait_for, wait_until

pytestmark = pytest.mark.slow  # live servers or CLI subprocesses: out of the fast loop (pytest -m 'not slow'); CI runs it

FAST = dict(worker_heartbeat_s=1, stale_after_s=4, reconcile_interval_s=1, requeue_after_s=3,
            checkpoint_every_steps=5, checkpoint_every_s=0)


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_model_dir, text_dir):
    var = tmp_path_factory.mktemp("var-worker-faults")
    with serving(var, server_env(var, tiny_model_dir, text_dir, **FAST), tiny_model_dir, text_dir) as server:
        yield server


def ready(srv) -> dict:
    return httpx.get(srv.url + "/readyz", timeout=10).json()


@pytest.mark.slow
def test_a_worker_killed_mid_job_is_restarted_and_the_job_resumes_from_its_checkpoint(srv):
    with srv.client(srv.alice) as client:
        job = client.post("/v1/jobs", json={"model": srv.model, "dataset": srv.data, "sparsity": 0.5, "window": 16,
                                            "seq_len": 64, "steps": 300}).json()
        wait_until(lambda: (client.get(f"/v1/jobs/{job['id']}").json().get("progress") or {}).get("step", 0) >= 12,
                   120, "the job is past step 12 (two checkpoints, every 5 steps)")
        first = the_worker(srv)
        os.kill(first, signal.SIGKILL)
        killed_at = client.get(f"/v1/jobs/{job['id']}").json()["progress"]["step"]
        # serve starts a new worker; at start it queues again the job its name left running; the outbox sends it.
        assert wait_until(lambda: [p for p in [the_worker(srv)] if p != first], 60, "a new worker")
        done = wait_for(client, job["id"], timeout=180)
        assert done["status"] == "succeeded", done
        events = client.get(f"/v1/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]
        statuses = [e["message"] for e in events if e["type"] == "status"]
        assert any("queued again (attempt 2 of 2)" in m for m in statuses), statuses
        assert sum(m.startswith("job running on") for m in statuses) == 2
        # The second attempt continues from the last state saved before the kill, not from step 0.
        second = max(i for i, e in enumerate(events) if e["message"].startswith("job running on"))
        resumed = [e for e in events[second:] if e["message"].startswith("resumed from step")]
        assert len(resumed) == 1, [e["message"] for e in events[second:]]
        step = resumed[0]["data"]["resumed_from_step"]
        assert step % 5 == 0 and 10 <= step <= killed_at, (step, killed_at)
        steps_after = [e["data"]["step"] for e in events[second:] if e["type"] == "progress"
                       and e["data"].get("phase") == "search"]
        assert steps_after[0] == step + 1 and steps_after[-1] == 300, steps_after[:3]
        # The resume point is the job's private file, never an artifact, and it goes when the job ends.
        names = [a["name"] for a in client.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]]
        assert not any("state" in n for n in names), names
        assert not (srv.artifact_dir / job["id"] / ".search_state.safetensors").exists()
    assert wait_until(lambda: ready(srv)["status"] == "ok", 30, "/readyz ok again")


def test_a_frozen_worker_makes_readyz_fail_and_its_cancelled_job_ends_cancelled(srv):
    with srv.client(srv.alice) as client:
        job = client.post("/v1/jobs", json={"model": srv.model, "dataset": srv.data, "sparsity": 0.5, "window": 16,
                                            "seq_len": 64, "steps": 5000}).json()
        wait_for(client, job["id"], statuses=("running",), timeout=120)
        worker = the_worker(srv)
        os.kill(worker, signal.SIGSTOP)  # alive to the OS, dead to the service: no step, no heartbeat
        try:
            assert client.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancel_requested"
            check = wait_until(lambda: (r := ready(srv))["status"] == "unavailable" and r, 30, "/readyz reports it")
            assert check["checks"]["worker"].startswith("error: no worker"), check
            # The reconciler ends it: its worker stopped beating, whatever its name.
            assert wait_for(client, job["id"], timeout=30)["status"] == "cancelled"
        finally:
            os.kill(worker, signal.SIGKILL)
        assert wait_until(lambda: ready(srv)["status"] == "ok", 60, "a restarted worker makes /readyz ok")
