"""Issue 23, point 2, with real processes: `consa serve` itself is killed (SIGKILL) or restarted (SIGTERM)
mid-job. A killed serve must leave no orphaned Celery worker (PR_SET_PDEATHSIG, or the worker's parent
watch: it hands its job back and exits), and a restarted serve adopts the job, which resumes from its
saved search state. A graceful restart (SIGTERM) hands the job back without counting a lost attempt, so
any number of them never fail a healthy job as `worker_lost` (CONSA_MAX_ATTEMPTS=2 here)."""

import os
import signal
import time
from pathlib import Path

import pytest

from service_fixtures import Server, child_pids, fault_record, server_env, wait_for, wait_until

pytestmark = pytest.mark.slow  # live servers or CLI subprocesses: out of the fast loop (pytest -m 'not slow'); CI runs it

FAST = dict(worker_heartbeat_s=1, stale_after_s=4, reconcile_interval_s=1, requeue_after_s=3,
            checkpoint_every_steps=5, checkpoint_every_s=0, max_attempts=2)
JOB = dict(sparsity=0.5, window=16, seq_len=64)


def alive(pid: int) -> bool:
    """Running (a zombie nobody reaps, in a container whose PID 1 does not, counts as gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return fields[0] != "Z"


def progress_step(client, job_id: str) -> int:
    job = client.get(f"/v1/jobs/{job_id}").json()
    return (job.get("progress") or {}).get("step", 0) if job["status"] == "running" else 0


def events(client, job_id: str) -> list[dict]:
    return client.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]


@pytest.fixture
def env(tmp_path, tiny_model_dir, text_dir):
    env = server_env(tmp_path / "var", tiny_model_dir, text_dir, **FAST)
    env["_model"], env["_data"] = str(tiny_model_dir), str(text_dir)
    return env


def start(env, tmp_path, n: int) -> Server:
    return Server({k: v for k, v in env.items() if not k.startswith("_")}, tmp_path / f"serve{n}.log").start()


@pytest.mark.slow
def test_a_killed_serve_leaves_no_worker_and_a_restarted_one_adopts_the_job(env, tmp_path):
    srv = start(env, tmp_path, 1)
    try:
        key = srv.create_key("alice")
        with srv.client(key) as client:
            job = client.post("/v1/jobs", json={"model": env["_model"], "dataset": env["_data"], **JOB,
                                                "steps": 400}).json()
            wait_until(lambda: progress_step(client, job["id"]) >= 12, 180, "the job is past step 12")
        [worker] = child_pids(srv.proc.pid)
        os.kill(srv.proc.pid, signal.SIGKILL)  # serve alone: not its process group
        killed = time.monotonic()
        wait_until(lambda: not alive(worker), 30, "the orphaned worker exits")
        worker_gone_s = time.monotonic() - killed
        srv.proc.wait()
    finally:
        srv.stop()
    assert worker_gone_s < 15, worker_gone_s
    srv = start(env, tmp_path, 2)
    try:
        with srv.client(key) as client:
            done = wait_for(client, job["id"], timeout=300)
            assert done["status"] == "succeeded", done
            log = events(client, job["id"])
    finally:
        srv.stop()
    messages = [e["message"] for e in log]
    assert sum(m.startswith("job running on") for m in messages) == 2, messages
    assert any("handed back: not a lost attempt" in m for m in messages), messages
    resumed = [e for e in log if e["message"].startswith("resumed from step")]
    assert len(resumed) == 1 and resumed[0]["data"]["resumed_from_step"] >= 10, messages
    fault_record("consa serve SIGKILLed mid-search", worker_exited_after_s=round(worker_gone_s, 1),
                 resumed_from_step=resumed[0]["data"]["resumed_from_step"], status=done["status"])


@pytest.mark.slow
def test_graceful_restarts_hand_the_job_back_and_never_count_as_lost_attempts(env, tmp_path):
    srv = start(env, tmp_path, 1)
    restarts = 3
    try:
        key = srv.create_key("alice")
        client = srv.client(key)
        job = client.post("/v1/jobs", json={"model": env["_model"], "dataset": env["_data"], **JOB,
                                            "steps": 120}).json()
        reached = 0
        for n in range(restarts):
            wait_until(lambda: progress_step(client, job["id"]) >= reached + 3, 180, "the job steps on")
            reached = progress_step(client, job["id"])
            srv.stop()  # SIGTERM: serve stops its worker, which hands the job back
            client.close()
            srv = start(env, tmp_path, n + 2)
            client = srv.client(key)
        done = wait_for(client, job["id"], timeout=300)
        log = events(client, job["id"])
        client.close()
    finally:
        srv.stop()
    fault_record(f"{restarts} graceful restarts (SIGTERM) of consa serve mid-search, CONSA_MAX_ATTEMPTS=2",
                 status=done["status"], handed_back=sum("handed back" in e["message"] for e in log
                                                        if e["type"] == "status"))
    assert done["status"] == "succeeded", done  # not worker_lost after 3 restarts with max_attempts=2
    messages = [e["message"] for e in log if e["type"] != "progress"]
    assert sum("handed back: not a lost attempt" in m for m in messages) == restarts, "\n".join(messages)
    assert sum(m.startswith("job running on") for m in messages) == restarts + 1, messages
    assert not any("lost; job queued again" in m for m in messages), messages
