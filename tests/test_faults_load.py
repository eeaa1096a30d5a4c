"""Issue 11, point 5: 200 concurrent submits get no 5xx, on the embedded default (SQLite + SQLite broker)
and on PostgreSQL + Redis; every 202 names a stored job."""

import asyncio
import uuid

import httpx
import pytest

from service_fixtures import (POSTGRES_URL, REDIS_URL, Server, _drop_queue, create_database, drop_database,
                              server_env)

N = 200


@pytest.mark.parametrize("backend", ["embedded", "redis-postgres"])
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
