"""Delivery safety of the worker, on a real database (SQLite and PostgreSQL), without a broker:
what happens when Celery hands a job to the runner more than once, or a worker died mid-job."""

import os
import subprocess
import sys

import pytest

from service import crud
from service.serve import prepare
from service.db import engine_for, sessionmaker_for
from service.schemas import JobCreate
from service.settings import Settings
from service_fixtures import POSTGRES_URL, ROOT, create_database, drop_database
from worker.runner import fail_orphans, run_job


@pytest.fixture(params=["sqlite", "postgres"])
def settings(request, tmp_path):
    if request.param == "sqlite":
        settings = Settings(var_dir=tmp_path)
        prepare(settings)
        yield settings
        return
    url, name = create_database(POSTGRES_URL)
    settings = Settings(var_dir=tmp_path, database_url=url)
    prepare(settings)
    try:
        yield settings
    finally:
        engine_for(url).dispose()
        drop_database(POSTGRES_URL, name)


def new_job(settings, key_name="k", params=None):
    with sessionmaker_for(settings.database_url)() as session:
        key = crud.get_api_key(session, key=crud.create_api_key(session, name=key_name))
        return crud.create_job(session, api_key_id=key.id, model="m", params=params or {}, meta={}).id


def job_row(settings, job_id):
    with sessionmaker_for(settings.database_url)() as session:
        return crud.get_job(session, job_id=job_id)


def claim(settings, job_id, worker):
    with sessionmaker_for(settings.database_url)() as session:
        return crud.claim_job(session, job_id=job_id, worker=worker)


def test_only_one_delivery_claims_a_job(settings):
    job_id = new_job(settings)
    assert claim(settings, job_id, "gpu0@host") is not None
    assert claim(settings, job_id, "gpu1@host") is None  # the redelivered copy
    row = job_row(settings, job_id)
    assert (row.status, row.worker, row.attempts) == ("running", "gpu0@host", 1)


def test_redelivery_leaves_a_live_job_alone_and_fails_a_dead_one(settings):
    job_id = new_job(settings)
    claim(settings, job_id, "gpu0@host")
    # Heartbeat fresh: the first worker is still on it, so the second delivery does nothing.
    assert run_job(job_id, settings, worker="gpu1@host") is None
    assert job_row(settings, job_id).status == "running"
    # No heartbeat for longer than stale_after_s: the first worker is gone; fail, never re-run.
    stale = settings.model_copy(update={"stale_after_s": 0})
    assert run_job(job_id, stale, worker="gpu1@host") is None
    row = job_row(settings, job_id)
    assert (row.status, row.error_code, row.error_type, row.attempts) == ("failed", "worker_lost", "system", 1)


def test_a_restarted_worker_fails_the_jobs_it_left_running(settings):
    mine, other, queued = new_job(settings), new_job(settings), new_job(settings)
    claim(settings, mine, "gpu0@host")
    claim(settings, other, "gpu1@host")
    assert fail_orphans(settings, "gpu0@host") == 1
    assert job_row(settings, mine).status == "failed" and job_row(settings, mine).error_code == "worker_lost"
    assert job_row(settings, other).status == "running" and job_row(settings, queued).status == "queued"


def test_unknown_job_ids_are_dropped(settings):
    assert run_job("job_doesnotexist", settings, worker="gpu0@host") is None


def test_keys_create_prints_the_key_last_on_a_fresh_database(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSA_")} | {"CONSA_VAR_DIR": str(tmp_path / "new")}
    out = subprocess.run([sys.executable, "-c", "from service.keys import create_key; create_key('ci')"], env=env,
                         cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    key = out.stdout.strip().splitlines()[-1]
    assert key.startswith("consa_") and len(key) > 40
    settings = Settings(var_dir=tmp_path / "new")
    with sessionmaker_for(settings.database_url)() as session:
        row = crud.get_api_key(session, key=key)
        assert row is not None and row.name == "ci" and row.key_hash != key  # only the hash is stored


def test_a_hub_id_that_names_a_local_folder_is_refused(settings, tmp_path, monkeypatch):
    """transformers would load "org/model" from the worker's working directory, outside the model roots."""
    (tmp_path / "org" / "model").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    params = dict(JobCreate(model="org/model", sparsity=0.5).model_dump(exclude={"metadata"}), dataset=str(tmp_path))
    job_id = new_job(settings, params=params)
    assert run_job(job_id, settings, worker="gpu0@host") == "failed"
    row = job_row(settings, job_id)
    assert (row.error_type, row.error_code) == ("user", "model_path_not_allowed")


def test_a_job_loads_its_model_once_for_search_and_evaluation(tmp_path, tiny_model_dir, text_dir, monkeypatch):
    """The search's copy is evaluated too; the only other load is export's CPU copy for the checkpoint."""
    import consa.loading

    loads = []
    real = consa.loading.load_model
    monkeypatch.setattr(consa.loading, "load_model", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    settings = Settings(var_dir=tmp_path)
    prepare(settings)
    params = dict(JobCreate(model=str(tiny_model_dir), sparsity=0.5, steps=2, seq_len=160, evaluate=True)
                  .model_dump(exclude={"metadata"}), dataset=str(text_dir))
    job_id = new_job(settings, params=params)
    assert run_job(job_id, settings, worker="gpu0@host") == "succeeded", job_row(settings, job_id).error_message
    assert loads == [str(tiny_model_dir)] * 2
    with sessionmaker_for(settings.database_url)() as session:
        names = {a.name for a in crud.get_job(session, job_id=job_id).artifacts}
    assert {"evaluation.json", "checkpoint.tar.gz", "manifest.json"} <= names
