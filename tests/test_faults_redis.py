"""Issue 11, points 2 and 4, with real processes: a private redis-server as the broker, PostgreSQL as
the database, `consa serve` with its Celery worker. Redis is killed with SIGKILL while jobs are queued,
a job is submitted while it is down (and retried with the same Idempotency-Key), then Redis comes back:
without AOF it comes back empty (the queued messages are lost) and the reconciler's outbox must
re-send them; with AOF (fsync always) it comes back with them, and the outbox's re-sends meet messages
that are still there. Either way every job runs to success, exactly once. Settings are shortened
(reconcile every 1 s, re-send after 3 s of an idle worker)."""

import shutil
import signal
import subprocess
import time

import httpx
import pytest

from service_fixtures import (POSTGRES_URL, Server, create_database, drop_database, free_port, server_env, wait_for,
                              wait_until)

FAST = dict(worker_heartbeat_s=1, stale_after_s=10, reconcile_interval_s=1, requeue_after_s=3)
pytestmark = [pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server on PATH"), pytest.mark.slow]  # live servers or CLI subprocesses: out of the fast loop (pytest -m 'not slow'); CI runs it


class PrivateRedis:
    """A redis-server of this test's own, on a free port. Without AOF a restart loses everything; with
    it (fsync on every write) a restart gives back every message acknowledged before the kill."""

    def __init__(self, workdir, aof: bool):
        self.port, self.workdir, self.aof, self.proc = free_port(), workdir, aof, None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "PrivateRedis":
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.aof else ["--appendonly", "no"]
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--save", "", *persistence, "--dir", str(self.workdir)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        wait_until(lambda: _pings(redis.Redis(port=self.port)), 20, "redis-server answers")
        return self

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def _pings(client) -> bool:
    try:
        return client.ping()
    except Exception:
        return False


@pytest.fixture(params=[False, True], ids=["no-aof", "aof"])
def broker_and_server(request, tmp_path, tiny_model_dir, text_dir):
    redis_server = PrivateRedis(tmp_path, aof=request.param).start()
    db_url, db_name = create_database(POSTGRES_URL)
    env = server_env(tmp_path / "var", tiny_model_dir, text_dir, database_url=db_url, broker_url=redis_server.url,
                     **FAST)
    srv = Server(env, tmp_path / "serve.log")
    try:
        srv.start()
        srv.alice = srv.create_key("alice")
        srv.model, srv.data = str(tiny_model_dir), str(text_dir)
        srv.queue = env["CONSA_QUEUE"]
        yield redis_server, srv
    finally:
        srv.stop()
        if redis_server.proc.poll() is None:
            redis_server.kill()
        drop_database(POSTGRES_URL, db_name)


@pytest.mark.slow
def test_jobs_lost_by_redis_and_submitted_while_it_is_down_all_run(broker_and_server):
    redis_server, srv = broker_and_server
    small = {"model": srv.model, "dataset": srv.data, "sparsity": 0.5, "window": 16, "seq_len": 64, "steps": 2}
    with srv.client(srv.alice) as client:
        blocker = client.post("/v1/jobs", json=small | {"steps": 5000}).json()
        wait_for(client, blocker["id"], statuses=("running",), timeout=120)
        queued = [client.post("/v1/jobs", json=small | {"seed": i}).json()["id"] for i in range(5)]

        redis_server.kill()
        start = time.monotonic()
        down = client.post("/v1/jobs", json=small | {"seed": 99}, headers={"Idempotency-Key": "while-down"})
        assert down.status_code == 202 and down.json()["status"] == "queued", down.text
        assert time.monotonic() - start < 20
        retry = client.post("/v1/jobs", json=small | {"seed": 99}, headers={"Idempotency-Key": "while-down"})
        assert retry.json()["id"] == down.json()["id"] and retry.headers["idempotent-replayed"] == "true"
        assert httpx.get(srv.url + "/readyz", timeout=10).json()["checks"]["broker"].startswith("error")

        redis_server.start()  # back, on the same port
        import redis

        # Without AOF the 5 queued messages are gone; with it they are all still there. (The job submitted
        # while Redis was down may already be there too: the reconciler publishes it as soon as it can.)
        messages = redis.Redis(port=redis_server.port).lrange(srv.queue, 0, -1)
        survived = [job_id for job_id in queued if any(job_id.encode() in m for m in messages)]
        assert len(survived) == (5 if redis_server.aof else 0), (survived, len(messages))
        client.post(f"/v1/jobs/{blocker['id']}/cancel")  # the worker goes idle; the lost jobs must be re-sent
        for job_id in [*queued, down.json()["id"]]:
            job = wait_for(client, job_id, timeout=120)
            assert job["status"] == "succeeded", job
            runs = [e for e in client.get(f"/v1/jobs/{job_id}/events").json()["data"]
                    if e["type"] == "status" and e["message"].startswith("job running on")]
            assert len(runs) == 1, runs  # a message delivered twice (AOF + the outbox) ran once
        assert wait_for(client, blocker["id"], timeout=30)["status"] == "cancelled"
