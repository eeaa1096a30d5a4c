"""The service end to end: real HTTP, a real Celery worker process, a tiny random model.

Every test runs twice: on the embedded default (SQLite + kombu's SQLAlchemy transport) and on
Redis + PostgreSQL (the `server` fixture's params).
"""

import hashlib
import json
import io
import tarfile
import time
from pathlib import Path

import pytest

from service_fixtures import assert_problem, server, wait_for  # noqa: F401  (server is a fixture)

pytestmark = pytest.mark.slow  # live servers or CLI subprocesses: out of the fast loop (pytest -m 'not slow'); CI runs it

SMALL = {"sparsity": 0.5, "granularity": "kv_head", "window": 16, "seq_len": 64, "steps": 8, "lr": 0.2}


def submit(client, server, **fields):
    body = {"model": server.model, "dataset": server.data} | SMALL | fields
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    return response.json()


def test_job_runs_to_success_with_downloadable_artifacts(server):
    with server.client(server.alice) as client:
        job = submit(client, server, metadata={"run": "e2e"})
        assert job["status"] == "queued" and job["object"] == "allocation.job" and job["id"].startswith("job_")
        seen = {job["status"]}
        deadline = time.monotonic() + 120
        while job["status"] not in ("succeeded", "failed", "cancelled") and time.monotonic() < deadline:
            time.sleep(0.05)
            job = client.get(f"/v1/jobs/{job['id']}").json()
            seen.add(job["status"])
        assert job["status"] == "succeeded", job
        assert job["error"] is None and job["metadata"] == {"run": "e2e"}
        assert job["progress"]["step"] == job["progress"]["total_steps"] == SMALL["steps"]
        assert job["started_at"] and job["finished_at"] >= job["started_at"] >= job["created_at"]

        # The events tell the whole story, in order: queued -> running -> one progress per search step,
        # then the export's stages (the phase after the search is never silent) -> succeeded.
        events = client.get(f"/v1/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]
        statuses = [e["data"]["status"] for e in events if e["type"] == "status"]
        assert statuses == ["queued", "running", "succeeded"], (statuses, seen)
        phases = [(e["data"]["phase"], e["data"]["phase_done"]) for e in events if e["type"] == "progress"]
        assert phases == [("search", s) for s in range(1, SMALL["steps"] + 1)] + [("export", d) for d in range(3)]
        assert job["progress"]["phase"] == "export" and job["progress"]["phase_done"] == job["progress"]["phase_total"]

        listed = client.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]
        names = {a["name"] for a in listed}
        assert {"manifest.json", "gates.safetensors", "heatmap.png", "checkpoint.tar"} <= names
        for artifact in listed:
            body = client.get(artifact["url"]).content
            assert len(body) == artifact["size"] and hashlib.sha256(body).hexdigest() == artifact["sha256"]
            if artifact["name"] == "checkpoint.tar":
                with tarfile.open(fileobj=io.BytesIO(body)) as tar:
                    members = {Path(m).name for m in tar.getnames()}
                assert {"config.json", "model.safetensors"} <= members, members
        manifest = client.get(f"/v1/jobs/{job['id']}/artifacts/manifest.json").json()
        assert manifest["format"] == "consa.allocation/v1" and manifest["sparsity_achieved"] == 0.5
        assert manifest["model"] == server.model


def test_artifact_download_supports_range_and_etag(server):
    with server.client(server.alice) as client:
        job = wait_for(client, submit(client, server, steps=2)["id"])
        url = f"/v1/jobs/{job['id']}/artifacts/manifest.json"
        full = client.get(url)
        etag = full.headers["etag"]
        assert etag == '"' + hashlib.sha256(full.content).hexdigest() + '"'
        part = client.get(url, headers={"Range": "bytes=10-19"})
        assert part.status_code == 206 and part.content == full.content[10:20]
        assert part.headers["content-range"] == f"bytes 10-19/{len(full.content)}"
        assert client.get(url, headers={"If-None-Match": etag}).status_code == 304
        assert_problem(client.get(url, headers={"Range": f"bytes={len(full.content) + 5}-"}), 416)


def test_cancel_mid_run_ends_cancelled(server):
    with server.client(server.alice) as client:
        job = submit(client, server, steps=5000)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # wait until the search is really stepping
            job = client.get(f"/v1/jobs/{job['id']}").json()
            if (job["progress"] or {}).get("step", 0) >= 2:
                break
            time.sleep(0.1)
        assert job["status"] == "running", job
        response = client.post(f"/v1/jobs/{job['id']}/cancel")
        assert response.status_code == 200 and response.json()["status"] in ("cancel_requested", "cancelled")
        job = wait_for(client, job["id"], timeout=60)
        assert job["status"] == "cancelled", job
        assert job["progress"]["step"] < 5000 and job["error"] is None
        assert client.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"] == []


def test_unloadable_model_fails_with_a_user_error(server):
    with server.client(server.alice) as client:
        job = wait_for(client, submit(client, server, model=server.broken_model)["id"])
        assert job["status"] == "failed", job
        assert job["error"]["type"] == "user" and job["error"]["code"] == "model_not_loadable"
        assert "cannot load model" in job["error"]["message"]


def evaluated_job(server, client, **fields) -> dict:
    """A succeeded job with `evaluate: true`; the evaluation path does not depend on the backend, so
    it runs once (embedded) to keep the suite's runtime down."""
    if server.backend != "embedded":
        pytest.skip("the evaluation path does not depend on the backend; once is enough for the runtime budget")
    job = wait_for(client, submit(client, server, evaluate=True, **fields)["id"], timeout=180)
    assert job["status"] == "succeeded", job
    return job


def test_evaluate_adds_the_comparison_table(server):
    with server.client(server.alice) as client:
        job = evaluated_job(server, client, steps=3, seq_len=160)
        names = {a["name"] for a in client.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]}
        assert {"evaluation.md", "evaluation.json", "heatmap.png"} <= names
        table = client.get(f"/v1/jobs/{job['id']}/artifacts/evaluation.md").text
        assert "| learned |" in table and "| full |" in table
        assert "| heuristic-loss |" in table and "| interleave-1:1 |" in table  # the training-free baseline too


def test_evaluate_at_a_context_too_short_for_retrieval_scores_the_loss_alone(server):
    with server.client(server.alice) as client:
        job = evaluated_job(server, client, steps=2, seq_len=48)
        events = client.get(f"/v1/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]
        assert any("evaluation without retrieval" in e["message"] for e in events), events
        records = json.loads(client.get(f"/v1/jobs/{job['id']}/artifacts/evaluation.json").text)
        assert {r["name"] for r in records} >= {"full", "learned"}
        assert all(r["retrieval_acc"] is None and r["loss"] > 0 for r in records)
