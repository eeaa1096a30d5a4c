"""Issue 11, point 5: 200 concurrent submits get no 5xx, on the embedded default (SQLite + SQLite broker)
and on PostgreSQL + Redis; every 202 names a stored job."""

import asyncio
import time
import uuid

import httpx
import pytest

from service_fixtures import (POSTGRES_URL, REDIS_URL, Server, _drop_queue, create_database, drop_database,
                              fault_record, server_env)

pytestmark = pytest.mark.slow  # live servers or CLI subprocesses: out of the fast loop (pytest -m 'not slow'); CI runs it

N = 200


@pytest.mark.parametrize("backend", ["embedded", "redis-postgres"])
@pytest.mark.slow
def test_200_concurrent_submits_get_no_5xx(backend, tmp_path, tiny_model_dir, text_dir):
    extra, db_name = {}, None
    if backend == "redis-postgres":
        extra["database_url"], db_name = create_database(POSTGRES_URL)
        extra["broker_url"] = REDIS_URL
    env = server_env(tmp_path / "var", tiny_model_dir, text_dir, max_active_jobs_per_key=N + 10, **extra)
    srv = Server(env, tmp_path / "serve.log")
    try:
        srv.start()
        key = srv.create_key("load")
        job = {"model": str(tiny_model_dir), "dataset": str(text_dir), "sparsity": 0.5, "window": 16,
               "seq_len": 64, "steps": 1}

        async def submit_all():
            limits = httpx.Limits(max_connections=N)
            async with httpx.AsyncClient(base_url=srv.url, headers={"Authorization": f"Bearer {key}"},
                                         timeout=120, limits=limits) as client:
                return await asyncio.gather(*[client.post("/v1/jobs", json=job | {"seed": i},
                                                          headers={"Idempotency-Key": uuid.uuid4().hex})
                                              for i in range(N)])

        responses = asyncio.run(submit_all())
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [202] * N, {s: statuses.count(s) for s in set(statuses)}
        ids = {r.json()["id"] for r in responses}
        with srv.client(key) as client:
            listed, after = set(), None
            while True:
                page = client.get("/v1/jobs", params={"limit": 100} | ({"after": after} if after else {})).json()
                listed |= {j["id"] for j in page["data"]}
                if not page["has_more"]:
                    break
                after = page["last_id"]
        assert listed == ids
    finally:
        srv.stop()
        if db_name:
            drop_database(POSTGRES_URL, db_name)
            _drop_queue(REDIS_URL, env["CONSA_QUEUE"])


QUOTA = 20


@pytest.mark.parametrize("backend", ["embedded", "redis-postgres"])
def test_the_active_job_quota_is_exact_under_200_concurrent_submits(backend, tmp_path, tiny_model_dir, text_dir):
    """Issue 23, point 5: the quota was check-then-insert (60 concurrent submits on one key: 31 accepted on
    SQLite, 21 on PostgreSQL; 200: 34). Counted under the key's row lock, exactly QUOTA are accepted."""
    extra, db_name = {}, None
    if backend == "redis-postgres":
        extra["database_url"], db_name = create_database(POSTGRES_URL)
        extra["broker_url"] = REDIS_URL
    env = server_env(tmp_path / "var", tiny_model_dir, text_dir, max_active_jobs_per_key=QUOTA, **extra)
    srv = Server(env, tmp_path / "serve.log")
    try:
        srv.start()
        key = srv.create_key("burst")
        job = {"model": str(tiny_model_dir), "dataset": str(text_dir), "sparsity": 0.5, "window": 16,
               "seq_len": 64, "steps": 5000}  # none ends during the burst and frees a place

        async def submit_all():
            async with httpx.AsyncClient(base_url=srv.url, headers={"Authorization": f"Bearer {key}"},
                                         timeout=120, limits=httpx.Limits(max_connections=N)) as client:
                return await asyncio.gather(*[client.post("/v1/jobs", json=job | {"seed": i}) for i in range(N)])

        started = time.monotonic()
        responses = asyncio.run(submit_all())
        took = time.monotonic() - started
        statuses = [r.status_code for r in responses]
        counts = {s: statuses.count(s) for s in set(statuses)}
        fault_record(f"{N} concurrent submits on one key, quota {QUOTA} ({backend})", accepted=counts.get(202, 0),
                     refused_429=counts.get(429, 0), other=N - counts.get(202, 0) - counts.get(429, 0),
                     burst_s=round(took, 1))
        assert counts == {202: QUOTA, 429: N - QUOTA}, counts
        assert all(r.json()["code"] == "too_many_active_jobs" for r in responses if r.status_code == 429)
        with srv.client(key) as client:
            listed = client.get("/v1/jobs", params={"limit": 100}).json()["data"]
            assert len(listed) == QUOTA
            for j in listed:
                client.post(f"/v1/jobs/{j['id']}/cancel")
    finally:
        srv.stop()
        if db_name:
            drop_database(POSTGRES_URL, db_name)
            _drop_queue(REDIS_URL, env["CONSA_QUEUE"])
