"""Issue 23, point 3, with real processes: the database (a private PostgreSQL, initdb + pg_ctl on a free
port) is stopped for a few seconds and started again while a job runs on `consa serve`'s worker (Redis
as the broker). The job must not stay stuck `running`: its worker waits the outage out and goes on, a
cancel after it ends the job `cancelled` within 10 s, and the next job runs. Settings are shortened."""

import shutil
import time

import httpx
import pytest

from service_fixtures import (REDIS_URL, PrivatePostgres, Server, _drop_queue, fault_record, server_env, wait_for,
                              wait_until)

FAST = dict(worker_heartbeat_s=1, stale_after_s=15, reconcile_interval_s=1, requeue_after_s=3,
            checkpoint_every_steps=5, checkpoint_every_s=0)
OUTAGE_S = 6
pytestmark = [pytest.mark.skipif(shutil.which("pg_ctl") is None or shutil.which("initdb") is None,
                                reason="needs initdb and pg_ctl on PATH"), pytest.mark.slow]  # live servers or CLI subprocesses: out of the fast loop (pytest -m 'not slow'); CI runs it


@pytest.fixture
def pg_server(tmp_path, tiny_model_dir, text_dir):
    pg = PrivatePostgres().init()
    env = server_env(tmp_path / "var", tiny_model_dir, text_dir, database_url=pg.url, broker_url=REDIS_URL, **FAST)
    srv = Server(env, tmp_path / "serve.log")
    try:
        srv.start()
        srv.alice = srv.create_key("alice")
        srv.model, srv.data = str(tiny_model_dir), str(text_dir)
        yield pg, srv
    finally:
        srv.stop()
        pg.destroy()
        _drop_queue(REDIS_URL, env["CONSA_QUEUE"])


def step_of(client, job_id: str) -> int:
    return (client.get(f"/v1/jobs/{job_id}").json().get("progress") or {}).get("step", 0)


def answered(client, job_id: str):
    try:
        return client.get(f"/v1/jobs/{job_id}").status_code == 200
    except httpx.TransportError:
        return False


@pytest.mark.slow
def test_a_postgres_restart_mid_job_leaves_no_stuck_job_and_cancel_works_through_it(pg_server):
    pg, srv = pg_server
    small = {"model": srv.model, "dataset": srv.data, "sparsity": 0.5, "window": 16, "seq_len": 64}
    with srv.client(srv.alice) as client:
        job = client.post("/v1/jobs", json=small | {"steps": 5000}).json()
        wait_until(lambda: step_of(client, job["id"]) >= 5, 180, "the job is past step 5")
        pg.stop()
        time.sleep(OUTAGE_S)
        pg.start()
        back = time.monotonic()
        wait_until(lambda: answered(client, job["id"]), 30, "the API reads the database again")
        before = step_of(client, job["id"])
        # The worker waited the outage out: the same job steps on (before the fix it stayed at its step).
        wait_until(lambda: step_of(client, job["id"]) >= before + 3, 60, "the job steps on after the restart")
        steps_on_s = time.monotonic() - back
        assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "running"
        asked = time.monotonic()
        # The worker checks for a cancel every step (~20 ms here): the answer may already say it ended.
        assert client.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] in ("cancel_requested", "cancelled")
        done = wait_for(client, job["id"], timeout=10)
        cancel_s = time.monotonic() - asked
        assert done["status"] == "cancelled", done
        after = client.post("/v1/jobs", json=small | {"steps": 3}).json()
        assert wait_for(client, after["id"], timeout=120)["status"] == "succeeded"
        stuck = [j["id"] for j in client.get("/v1/jobs", params={"limit": 100}).json()["data"]
                 if j["status"] not in ("succeeded", "failed", "cancelled")]
        assert stuck == []
    fault_record("PostgreSQL stopped mid-job", outage_s=OUTAGE_S, stepped_on_after_restart_s=round(steps_on_s, 1),
                 cancel_to_cancelled_s=round(cancel_s, 2), stuck_jobs=len(stuck))


@pytest.mark.slow
def test_a_job_no_process_runs_goes_stale_though_its_worker_lives(pg_server):
    """What kept the job stuck: its attempt had given up while the worker process lived on, beating the
    heartbeat of every job that named it. Now a worker beats only the job it runs, so such a row goes
    stale and the reconciler settles it (here failed as worker_lost: its attempts are used up)."""
    import datetime as dt

    import sqlalchemy as sa

    from service.crud import heartbeats, job_records
    from service.db import sessionmaker_for
    from service.models import utcnow

    pg, srv = pg_server
    with sessionmaker_for(srv.env["CONSA_DATABASE_URL"])() as session:
        [worker] = heartbeats.live_workers(session, stale_before=utcnow() - dt.timedelta(seconds=30))
        key_id = session.scalar(sa.text("SELECT id FROM api_keys LIMIT 1"))
        orphan = job_records.create_job(session, api_key_id=key_id, model="m", params={}, meta={})
        session.execute(sa.text("UPDATE jobs SET status='running', worker=:w, attempts=2, heartbeat_at=now(), "
                                "enqueued_at=now() WHERE id=:id"), {"w": worker.name, "id": orphan.id})
        session.commit()
    with srv.client(srv.alice) as client:
        ended = wait_for(client, orphan.id, timeout=60)  # stale after 15 s, then a reconcile pass
    assert ended["status"] == "failed" and ended["error"]["code"] == "worker_lost", ended
