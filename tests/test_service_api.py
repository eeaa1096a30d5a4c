"""The v1 API's contract over real HTTP: auth, validation problems, idempotency, pagination, events,
artifact names, health. Runs on both backends (see the `server` fixture)."""

import datetime as dt
import json

import pytest
import sqlalchemy as sa

from service.settings import Settings
from service_fixtures import assert_problem, server, wait_for  # noqa: F401  (server is a fixture)
from worker.runner import run_job

pytestmark = pytest.mark.slow  # live servers or CLI subprocesses: out of the fast loop (pytest -m 'not slow'); CI runs it

TINY = {"sparsity": 0.5, "window": 16, "seq_len": 64, "steps": 2}


def body(server, **fields):
    return {"model": server.model, "dataset": server.data} | TINY | fields


def submit(client, server, headers=None, **fields):
    response = client.post("/v1/jobs", json=body(server, **fields), headers=headers)
    assert response.status_code == 202, response.text
    return response.json()


@pytest.fixture(scope="module")
def finished_job(server):
    """One succeeded job of alice's, shared by the read-only tests."""
    with server.client(server.alice) as client:
        job = wait_for(client, submit(client, server)["id"])
    assert job["status"] == "succeeded", job
    return job


def test_requests_need_a_valid_key(server):
    with server.client() as anonymous:
        response = anonymous.get("/v1/jobs")
        assert_problem(response, 401, "unauthorized")
        assert response.headers["www-authenticate"] == "Bearer"
    with server.client("consa_not-a-real-key") as stranger:
        assert_problem(stranger.post("/v1/jobs", json=body(server)), 401, "unauthorized")


@pytest.mark.parametrize("fields, field, code", [
    ({"sparsity": 1.5}, "sparsity", "validation_error"),
    ({"granularity": "attention_head"}, "granularity", "validation_error"),
    ({"model": "/etc"}, "model", "model_path_not_allowed"),
    ({"model": "../../etc/passwd"}, "model", "model_path_not_allowed"),
    ({"model": "org/name"}, "model", "hub_models_disabled"),
    ({"dataset": "/etc/hostname"}, "dataset", "dataset_path_not_allowed"),
    ({"steps": 0}, "steps", "validation_error"),
    ({"sparsty": 0.5}, "sparsty", "validation_error"),  # misspelt fields are errors, not ignored
])
def test_bad_input_is_a_problem_document(server, fields, field, code):
    with server.client(server.alice) as client:
        problem = assert_problem(client.post("/v1/jobs", json=body(server, **fields)), 422, code)
        assert ["body", field] in [e["loc"] for e in problem["errors"]], problem
        assert field in problem["detail"]


def test_malformed_json_is_a_400_problem(server):
    with server.client(server.alice) as client:
        response = client.post("/v1/jobs", content=b'{"model": "x", "sparsity": ', headers={"Content-Type": "application/json"})
        assert_problem(response, 400, "malformed_json")


def test_another_keys_job_is_not_found(server, finished_job):
    job_id = finished_job["id"]
    with server.client(server.bob) as bob:
        for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/events", f"/v1/jobs/{job_id}/artifacts",
                     f"/v1/jobs/{job_id}/artifacts/manifest.json"):
            assert_problem(bob.get(path), 404, "job_not_found")
        assert_problem(bob.post(f"/v1/jobs/{job_id}/cancel"), 404, "job_not_found")
        assert job_id not in [j["id"] for j in bob.get("/v1/jobs").json()["data"]]
    with server.client(server.alice) as alice:  # the owner still sees it
        assert alice.get(f"/v1/jobs/{job_id}").status_code == 200
        assert_problem(alice.get("/v1/jobs/job_000000000000000000000000"), 404, "job_not_found")


def test_artifact_names_cannot_leave_the_job(server, finished_job):
    base = f"/v1/jobs/{finished_job['id']}/artifacts/"
    with server.client(server.alice) as client:
        # Percent-encoded, as a client sends them (httpx, like browsers, would resolve a literal "../").
        for name in ("..%2F..%2F..%2Fetc%2Fpasswd", "%2E%2E", "..%2Fmanifest.json", ".manifest.json.tmp", "a%2Fb"):
            assert_problem(client.get(base + name), 400, "invalid_artifact_name")
        assert_problem(client.get(base + "nothing.bin"), 404, "artifact_not_found")


def test_idempotency_key_returns_the_same_job(server):
    headers = {"Idempotency-Key": "create-once-1"}
    with server.client(server.alice) as alice:
        first = submit(alice, server, headers=headers, seed=7)
        again = alice.post("/v1/jobs", json=body(server, seed=7), headers=headers)
        assert again.status_code == 202 and again.json()["id"] == first["id"]
        assert again.headers["idempotent-replayed"] == "true"
        other = alice.post("/v1/jobs", json=body(server, seed=8), headers=headers)
        assert_problem(other, 422, "idempotency_key_reused")
        assert alice.post("/v1/jobs", json=body(server, seed=7), headers={"Idempotency-Key": "another"}).json()["id"] \
            != first["id"]
    with server.client(server.bob) as bob:  # keys are scoped to the API key that used them
        assert submit(bob, server, headers=headers, seed=7)["id"] != first["id"]

    # After the key's time to live (24 h by default) it may name a new request.
    db_url = server.env.get("CONSA_DATABASE_URL") or f"sqlite:///{server.env['CONSA_VAR_DIR']}/consa.db"
    engine = sa.create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE jobs SET created_at = :t WHERE id = :id"),
                     {"t": dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc), "id": first["id"]})
    engine.dispose()
    with server.client(server.alice) as alice:
        fresh = alice.post("/v1/jobs", json=body(server, seed=8), headers=headers)
        assert fresh.status_code == 202 and fresh.json()["id"] != first["id"]
        assert "idempotent-replayed" not in fresh.headers
        assert alice.get(f"/v1/jobs/{first['id']}").status_code == 200  # the old job stays


def test_jobs_list_paginates_newest_first_with_filters(server):
    key = server.create_key("pager")  # a fresh key: its list holds only this test's jobs
    with server.client(key) as client:
        # Long enough that each is still queued or running when its cancel lands: the worker stays free.
        created = [submit(client, server, seed=i, steps=5000)["id"] for i in range(5)]
        for job_id in created:
            client.post(f"/v1/jobs/{job_id}/cancel")
        seen, after = [], None
        while True:
            page = client.get("/v1/jobs", params={"limit": 2} | ({"after": after} if after else {})).json()
            assert page["object"] == "list" and len(page["data"]) <= 2
            seen += [j["id"] for j in page["data"]]
            if not page["has_more"]:
                break
            after = page["last_id"]
        assert seen == created[::-1]
        for job_id in created:
            wait_for(client, job_id, timeout=60)
        cancelled = client.get("/v1/jobs", params={"status": "cancelled", "limit": 100}).json()["data"]
        assert {j["id"] for j in cancelled} == set(created)
        assert client.get("/v1/jobs", params={"status": "running"}).json()["data"] == []
        assert len(client.get("/v1/jobs", params={"model": server.model}).json()["data"]) == 5
        assert client.get("/v1/jobs", params={"model": "/elsewhere"}).json()["data"] == []
        assert_problem(client.get("/v1/jobs", params={"status": "sleeping"}), 422, "validation_error")
        assert_problem(client.get("/v1/jobs", params={"limit": 1000}), 422, "validation_error")
        # A cursor naming no job of this key (never one, deleted, another key's): an empty last page, which
        # the schema can state (a 400 for a schema-valid cursor was a schemathesis failure).
        assert client.get("/v1/jobs", params={"after": "job_unknown"}).json() == \
            {"object": "list", "data": [], "has_more": False, "first_id": None, "last_id": None}


def test_events_paginate_and_stream(server, finished_job):
    url = f"/v1/jobs/{finished_job['id']}/events"
    with server.client(server.alice) as client:
        everything = client.get(url, params={"limit": 1000}).json()["data"]
        paged, after = [], None
        while True:
            page = client.get(url, params={"limit": 3} | ({"after": after} if after is not None else {})).json()
            paged += page["data"]
            if not page["has_more"]:
                break
            after = page["data"][-1]["id"]
        assert paged == everything and [e["id"] for e in paged] == sorted(e["id"] for e in paged)

        # The job has ended, so the stream sends every event and closes.
        with client.stream("GET", url, headers={"Accept": "text/event-stream"}) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            text = "".join(response.iter_text())
        frames = [f for f in text.split("\n\n") if f.startswith("id:")]
        assert [json.loads(f.split("data: ", 1)[1])["id"] for f in frames] == [e["id"] for e in everything]
        resumed = client.get(url, params={"stream": "true"}, headers={"Last-Event-ID": str(everything[-2]["id"])})
        assert resumed.text.count("id: ") == 1


def test_a_redelivered_message_does_not_run_a_running_job_again(server):
    """What acks_late + a Redis visibility timeout can cause: a second delivery while the job runs."""
    settings = Settings(var_dir=server.env["CONSA_VAR_DIR"], database_url=server.env.get("CONSA_DATABASE_URL", ""))
    with server.client(server.alice) as client:
        job = submit(client, server, steps=5000)
        job = wait_for(client, job["id"], statuses=("running",), timeout=60)
        assert run_job(job["id"], settings, worker="second-delivery") is None
        client.post(f"/v1/jobs/{job['id']}/cancel")
        job = wait_for(client, job["id"], timeout=60)
        assert job["status"] == "cancelled"
        running = [e for e in client.get(f"/v1/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]
                   if e["type"] == "status" and e["data"]["status"] == "running"]
        assert len(running) == 1 and "second-delivery" not in running[0]["message"]
        # ... and a delivery after the end changes nothing either.
        assert run_job(job["id"], settings, worker="late-delivery") is None
        assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled"


def test_health_readiness_and_metrics(server, finished_job):
    with server.client() as client:
        assert client.get("/healthz").json()["status"] == "ok"
        ready = client.get("/readyz").json()
        assert ready == {"status": "ok", "checks": {"database": "ok", "broker": "ok", "worker": "ok", "artifacts": "ok"}}
        metrics = client.get("/metrics").text
        assert 'consa_jobs{status="succeeded"}' in metrics
        assert 'consa_http_requests_total{method="GET",route="/v1/jobs/{job_id}",status="200"}' in metrics


def test_delete_frees_a_finished_job_and_refuses_a_live_one(server):
    with server.client(server.alice) as client:
        job = wait_for(client, submit(client, server, steps=2)["id"])
        assert job["status"] == "succeeded" and (server.artifact_dir / job["id"] / "manifest.json").exists()
        assert_problem(server.client(server.bob).delete(f"/v1/jobs/{job['id']}"), 404, "job_not_found")

        response = client.delete(f"/v1/jobs/{job['id']}")
        assert response.status_code == 200 and response.json() == {"object": "allocation.job", "id": job["id"],
                                                                   "deleted": True}
        assert not (server.artifact_dir / job["id"]).exists()
        assert_problem(client.get(f"/v1/jobs/{job['id']}"), 404, "job_not_found")
        assert_problem(client.get(f"/v1/jobs/{job['id']}/events"), 404, "job_not_found")
        assert_problem(client.delete(f"/v1/jobs/{job['id']}"), 404, "job_not_found")

        live = submit(client, server, steps=5000)
        assert_problem(client.delete(f"/v1/jobs/{live['id']}"), 409, "job_not_finished")
        client.post(f"/v1/jobs/{live['id']}/cancel")
        assert wait_for(client, live["id"], timeout=60)["status"] == "cancelled"
        assert client.delete(f"/v1/jobs/{live['id']}").status_code == 200


# -- issue 11: hostile input is a 4xx, never a 500; bounds; revocation; artifact edges ------------
@pytest.mark.parametrize("fields, field, code", [
    ({"model": "/models/a\u0000b"}, "model", "invalid_character"),
    ({"dataset": "/data/\u0000"}, "dataset", "invalid_character"),
    ({"metadata": {"k": "v\u0000"}}, "metadata", "invalid_character"),
    ({"metadata": {"big": "x" * 5000}}, "metadata", "metadata_too_large"),
    ({"steps": 1_000_000}, "steps", "limit_exceeded"),
    ({"seq_len": 1 << 20}, "seq_len", "limit_exceeded"),
    ({"batch_size": 4096}, "batch_size", "limit_exceeded"),
    ({"steps": 20_000, "seq_len": 32_768, "batch_size": 64}, "steps", "limit_exceeded"),  # tokens per job
    ({"evaluate": True, "duo_steps": 1_000_000}, "duo_steps", "limit_exceeded"),  # the duo baseline's training
])
def test_hostile_or_oversized_input_is_a_4xx_problem(server, fields, field, code):
    with server.client(server.alice) as client:
        problem = assert_problem(client.post("/v1/jobs", json=body(server, **fields)), 422, code)
        assert field in problem["detail"]


def test_hostile_queries_and_ids_are_4xx(server, finished_job):
    with server.client(server.alice) as client:
        events = client.get(f"/v1/jobs/{finished_job['id']}/events", params={"after": 2147483648})
        assert events.status_code == 200 and events.json()["data"] == []
        assert_problem(client.get("/v1/jobs/job_%00x"), 404, "job_not_found")
        assert_problem(client.get("/v1/jobs", params={"model": "a\u0000"}), 422, "invalid_character")
        assert_problem(client.post("/v1/jobs", content=b"[" * 70_000, headers={"Content-Type": "application/json"}),
                       413, "request_too_large")


def test_hub_models_are_off_by_default():
    assert Settings(var_dir="/nonexistent").allow_hub_models is False


def test_a_revoked_key_is_refused_at_once(server):
    import subprocess
    import sys

    from service_fixtures import ROOT

    key = server.create_key("short-lived")
    with server.client(key) as client:
        assert client.get("/v1/jobs").status_code == 200
        subprocess.run([sys.executable, "-m", "service.keys", "revoke", "short-lived"], env=server.env, cwd=ROOT,
                       check=True, capture_output=True, timeout=60)
        assert_problem(client.get("/v1/jobs"), 401, "unauthorized")
    listed = subprocess.run([sys.executable, "-m", "service.keys", "list"], env=server.env, cwd=ROOT, check=True,
                            capture_output=True, text=True, timeout=60).stdout
    line = next(l for l in listed.splitlines() if l.startswith("short-lived"))
    assert line.split()[-1] != "-" and key not in listed  # revoked, and the key itself is never shown


def test_artifacts_head_types_urls_and_missing_files(server, finished_job):
    base = f"/v1/jobs/{finished_job['id']}/artifacts"
    with server.client(server.alice) as client:
        listed = client.get(base, headers={"Host": "evil.example"}).json()["data"]
        assert all(a["url"].startswith(base + "/") for a in listed), listed  # never the Host header
        manifest = next(a for a in listed if a["name"] == "manifest.json")
        head = client.head(f"{base}/manifest.json")
        assert head.status_code == 200 and head.content == b""
        assert head.headers["etag"] == f'"{manifest["sha256"]}"' and int(head.headers["content-length"]) == manifest["size"]
        assert head.headers["content-type"].startswith("application/json")
        assert client.options(f"/v1/jobs/{finished_job['id']}").headers["allow"] == "DELETE, GET"

    # A listed artifact whose file is gone: 410, not 500 (on a copy of the job, so the shared one stays whole).
    with server.client(server.alice) as client:
        job = wait_for(client, submit(client, server)["id"])
        (server.artifact_dir / job["id"] / "heatmap.png").unlink()
        assert_problem(client.get(f"/v1/jobs/{job['id']}/artifacts/heatmap.png"), 410, "artifact_gone")


def test_a_key_over_its_quota_gets_429_with_retry_after(server):
    key = server.create_key("quota")
    with server.client(key) as client:
        created = []
        try:
            for i in range(25):
                response = client.post("/v1/jobs", json=body(server, seed=i, steps=5000))
                if response.status_code == 429:
                    break
                assert response.status_code == 202, response.text
                created.append(response.json()["id"])
            assert len(created) == 20  # CONSA_MAX_ACTIVE_JOBS_PER_KEY
            assert_problem(response, 429, "too_many_active_jobs")
            assert int(response.headers["retry-after"]) > 0
        finally:
            for job_id in created:
                client.post(f"/v1/jobs/{job_id}/cancel")
        for job_id in created:
            wait_for(client, job_id, timeout=60)
