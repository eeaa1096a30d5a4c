"""Delivery safety of the worker, on a real database (SQLite and PostgreSQL), without a broker:
what happens when Celery hands a job to the runner more than once, or a worker died mid-job."""

import os
import subprocess
import sys

import pytest

from service.crud import api_keys, artifact_records, heartbeats, job_events, job_records, job_states, outbox
from service.serve import prepare
from service.db import engine_for, sessionmaker_for
from service.models import Job, utcnow
from service.schemas import JobCreate
from service.settings import Settings
from service_fixtures import POSTGRES_URL, ROOT, create_database, drop_database
from worker.runner import run_job

pytestmark = pytest.mark.slow  # live servers or CLI subprocesses: out of the fast loop (pytest -m 'not slow'); CI runs it


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
        key = api_keys.get_api_key(session, key=api_keys.create_api_key(session, name=key_name))
        return job_records.create_job(session, api_key_id=key.id, model="m", params=params or {}, meta={}).id


def job_row(settings, job_id):
    with sessionmaker_for(settings.database_url)() as session:
        return job_records.get_job(session, job_id=job_id)


def claim(settings, job_id, worker):
    with sessionmaker_for(settings.database_url)() as session:
        return job_states.claim_job(session, job_id=job_id, worker=worker)


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


def test_a_restarted_worker_requeues_then_fails_the_jobs_it_left_running(settings):
    """What a worker does at start (worker/tasks.py, _on_ready): settle the jobs its name still runs,
    which died with its previous process; no other worker's job, no queued job."""
    from service.reconciler import settle_lost

    mine, other, queued = new_job(settings), new_job(settings), new_job(settings)
    claim(settings, mine, "gpu0@host")
    claim(settings, other, "gpu1@host")
    assert settle_lost(settings, worker="gpu0@host") == {"cancelled": [], "requeued": [mine], "failed": []}
    claim(settings, mine, "gpu0@host")  # attempt 2 of max_attempts = 2, whose process dies too
    assert settle_lost(settings, worker="gpu0@host") == {"cancelled": [], "requeued": [], "failed": [mine]}
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
        row = api_keys.get_api_key(session, key=key)
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


@pytest.mark.slow
def test_a_job_loads_its_model_once_for_search_and_evaluation(tmp_path, tiny_model_dir, text_dir, monkeypatch):
    """The search's copy is evaluated too; the only other load is export's CPU copy for the checkpoint."""
    import consa.model.loading
    import consa.model.sharding

    loads = []
    real = consa.model.loading.load_model
    counted = lambda *a, **k: loads.append(a[0]) or real(*a, **k)  # noqa: E731
    monkeypatch.setattr(consa.model.loading, "load_model", counted)
    monkeypatch.setattr(consa.model.sharding, "load_model", counted)  # it holds its own name for it
    settings = Settings(var_dir=tmp_path)
    prepare(settings)
    params = dict(JobCreate(model=str(tiny_model_dir), sparsity=0.5, steps=2, seq_len=160, evaluate=True)
                  .model_dump(exclude={"metadata"}), dataset=str(text_dir))
    job_id = new_job(settings, params=params)
    assert run_job(job_id, settings, worker="gpu0@host") == "succeeded", job_row(settings, job_id).error_message
    assert loads == [str(tiny_model_dir)] * 2
    with sessionmaker_for(settings.database_url)() as session:
        names = {a.name for a in job_records.get_job(session, job_id=job_id).artifacts}
    assert {"evaluation.json", "checkpoint.tar", "manifest.json"} <= names


# -- issue 11: every phase honours a cancel; disk faults fail fast, without paths or partial artifacts --
def tiny_job(settings, tiny_model_dir, text_dir, **fields):
    fields = dict(model=str(tiny_model_dir), sparsity=0.5, steps=2, seq_len=64, window=16) | fields
    params = dict(JobCreate(**fields).model_dump(exclude={"metadata"}), dataset=str(text_dir))
    return new_job(settings, params=params)


def events_of(settings, job_id):
    with sessionmaker_for(settings.database_url)() as session:
        return job_events.list_events(session, job=job_records.get_job(session, job_id=job_id), limit=1000)[0]


@pytest.fixture
def sqlite_settings(tmp_path):
    settings = Settings(var_dir=tmp_path / "var")
    prepare(settings)
    return settings


def test_a_cancel_during_the_export_ends_the_job_cancelled(sqlite_settings, tiny_model_dir, text_dir, monkeypatch):
    import consa.export.checkpoint

    settings, real = sqlite_settings, consa.export.checkpoint.export_hybrid

    def export_then_cancel(*args, **kwargs):
        with sessionmaker_for(settings.database_url)() as session:  # the API's cancel, mid-export
            job_states.request_cancel(session, job=job_records.get_job(session, job_id=job_id))
        return real(*args, **kwargs)

    monkeypatch.setattr(consa.export.checkpoint, "export_hybrid", export_then_cancel)
    job_id = tiny_job(settings, tiny_model_dir, text_dir)
    assert run_job(job_id, settings, worker="gpu0@host") == "cancelled"


def test_a_cancel_during_the_evaluation_stops_it(sqlite_settings, tiny_model_dir, text_dir, monkeypatch):
    import consa.recipe.pipeline

    settings, real = sqlite_settings, consa.recipe.pipeline.evaluate_allocation

    def cancel_then_evaluate(*args, **kwargs):
        with sessionmaker_for(settings.database_url)() as session:
            job_states.request_cancel(session, job=job_records.get_job(session, job_id=job_id))
        return real(*args, **kwargs)

    monkeypatch.setattr(consa.recipe.pipeline, "evaluate_allocation", cancel_then_evaluate)
    job_id = tiny_job(settings, tiny_model_dir, text_dir, evaluate=True)
    assert run_job(job_id, settings, worker="gpu0@host") == "cancelled"
    assert not any("checkpoint" in e.message for e in events_of(settings, job_id))  # export never began


def test_an_unwritable_store_fails_before_the_search_and_names_no_path(tmp_path, tiny_model_dir, text_dir):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the artifact store should be\n")
    settings = Settings(var_dir=tmp_path / "var", artifact_dir=blocker / "artifacts")
    prepare_db = Settings(var_dir=tmp_path / "var")
    prepare(prepare_db)
    job_id = tiny_job(settings, tiny_model_dir, text_dir)
    assert run_job(job_id, settings, worker="gpu0@host") == "failed"
    row = job_row(settings, job_id)
    assert (row.error_type, row.error_code) == ("system", "storage_error")
    assert "/" not in row.error_message, row.error_message
    assert not [e for e in events_of(settings, job_id) if e.type == "progress"]  # no search step ran


def test_a_failed_job_lists_no_partial_artifacts_and_shows_no_server_path(sqlite_settings, tiny_model_dir, text_dir,
                                                                          monkeypatch):
    import consa.export.checkpoint

    def broken_export(*args, **kwargs):
        raise RuntimeError(f"could not write {sqlite_settings.artifact_dir}/tmp/shard-0.bin")

    monkeypatch.setattr(consa.export.checkpoint, "export_hybrid", broken_export)
    job_id = tiny_job(sqlite_settings, tiny_model_dir, text_dir)
    assert run_job(job_id, sqlite_settings, worker="gpu0@host") == "failed"
    row = job_row(sqlite_settings, job_id)
    assert row.error_code == "internal_error" and str(sqlite_settings.artifact_dir) not in row.error_message
    assert "<path>" in row.error_message
    assert any("manifest.json" in e.message for e in events_of(sqlite_settings, job_id))  # it had published some
    with sessionmaker_for(sqlite_settings.database_url)() as session:
        assert artifact_records.list_artifacts(session, job=job_records.get_job(session, job_id=job_id)) == []
    assert not (sqlite_settings.artifact_dir / job_id).exists()


# -- the reconciler's decisions, on a real database ----------------------------------------------
def age(settings, job_id, seconds):
    """Make the job's heartbeat `seconds` old (its worker stopped beating then)."""
    import datetime as dt

    import sqlalchemy as sa

    with engine_for(settings.database_url).begin() as conn:
        conn.execute(sa.text("UPDATE jobs SET heartbeat_at = :t WHERE id = :id"),
                     {"t": utcnow() - dt.timedelta(seconds=seconds), "id": job_id})


def test_a_stale_job_is_requeued_then_failed_whatever_its_worker_name(settings):
    from service.reconciler import settle_lost

    job_id, live = new_job(settings), new_job(settings)
    claim(settings, job_id, "ghost@gone")
    claim(settings, live, "gpu1@host")
    age(settings, job_id, settings.stale_after_s + 5)
    assert settle_lost(settings) == {"cancelled": [], "requeued": [job_id], "failed": []}
    row = job_row(settings, job_id)
    assert (row.status, row.worker, row.enqueued_at) == ("queued", None, None)  # the outbox sends it again
    assert job_row(settings, live).status == "running"  # a fresh heartbeat is left alone
    claim(settings, job_id, "gpu2@host")  # attempt 2 of max_attempts = 2 dies too
    age(settings, job_id, settings.stale_after_s + 5)
    from service import artifacts

    state = artifacts.search_state_path(settings.artifact_dir, job_id)
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_bytes(b"attempt 2's resume point")
    assert settle_lost(settings)["failed"] == [job_id]
    assert not state.exists()  # nothing will resume the failed job
    row = job_row(settings, job_id)
    assert (row.status, row.error_code, row.attempts) == ("failed", "worker_lost", 2)


def test_a_cancel_requested_job_whose_worker_died_ends_cancelled(settings):
    from service.reconciler import settle_lost

    job_id = new_job(settings)
    claim(settings, job_id, "ghost@gone")
    with sessionmaker_for(settings.database_url)() as session:
        job_states.request_cancel(session, job=job_records.get_job(session, job_id=job_id))
    age(settings, job_id, settings.stale_after_s + 5)
    assert settle_lost(settings)["cancelled"] == [job_id]
    assert job_row(settings, job_id).status == "cancelled"


def test_the_outbox_sends_unsent_jobs_and_resends_only_while_a_worker_idles(settings):
    import datetime as dt

    from sqlalchemy import update

    now = utcnow()
    old = now - dt.timedelta(seconds=600)
    unsent, sent = new_job(settings), new_job(settings)
    with sessionmaker_for(settings.database_url)() as session:
        session.execute(update(Job).values(created_at=old))
        session.commit()
        outbox.mark_enqueued(session, job_id=sent)
        session.execute(update(Job).where(Job.id == sent).values(enqueued_at=old))
        session.commit()
        # No idle worker: only the never-sent job is due.
        assert outbox.jobs_to_publish(session, created_before=now, republish_before=None) == [unsent]
        assert not heartbeats.idle_worker_exists(session, stale_before=old, idle_before=now)
        heartbeats.beat_worker(session, worker="gpu0@host")  # alive and idle from now on
        assert heartbeats.idle_worker_exists(session, stale_before=old, idle_before=now + dt.timedelta(seconds=1))
        assert outbox.jobs_to_publish(session, created_before=now, republish_before=now) == [unsent, sent]


def test_the_search_state_is_saved_every_n_steps_and_survives_a_requeue_but_not_the_end(tmp_path):
    import torch

    from consa.search.loop import load_gate_state
    from service import artifacts
    from worker.runner import StateSaver

    path = artifacts.search_state_path(tmp_path, "job_x")
    saver = StateSaver(path, every_steps=5, every_s=0)
    for step in range(1, 13):
        saver({"log_alpha": torch.full((4,), float(step)), "step": step, "lambda1": 0.1 * step})
    state = load_gate_state(path)
    assert state["step"] == 10 and torch.equal(state["log_alpha"], torch.full((4,), 10.0))
    assert not list(path.parent.glob("*.tmp"))  # the temporary file was renamed into place
    # The search's last state is always written: a kill during the evaluation or export resumes past it.
    finishing = StateSaver(path, every_steps=5, every_s=0, last_step=12)
    for step in range(1, 13):
        finishing({"log_alpha": torch.full((4,), float(step)), "step": step, "lambda1": 0.1 * step})
    assert load_gate_state(path)["step"] == 12
    (path.parent / "manifest.json").write_text("{}")
    artifacts.remove_job_files(tmp_path, "job_x", keep_search_state=True)  # a requeue
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    assert not artifacts.valid_name(path.name)  # never served as an artifact
    artifacts.remove_job_files(tmp_path, "job_x")  # the job ended
    assert not path.parent.exists()


def test_an_attempt_that_lost_its_job_to_a_requeue_can_no_longer_end_or_publish_it(settings, tmp_path):
    """A worker frozen past its heartbeat (SIGSTOP, a hung driver) wakes after the reconciler gave its
    job to a new process of the same worker name: it must stop without touching the new attempt."""
    from consa.core.errors import Cancelled
    from service.reconciler import settle_lost
    from worker.runner import JobRun

    job_id = new_job(settings)
    with sessionmaker_for(settings.database_url)() as session:
        old = JobRun(session, job_states.claim_job(session, job_id=job_id, worker="gpu0@host"), settings)
        assert not old.should_cancel()
        age(settings, job_id, settings.stale_after_s + 5)
        assert settle_lost(settings)["requeued"] == [job_id]
        claim(settings, job_id, "gpu0@host")  # attempt 2, same name
        assert old.should_cancel()
        (tmp_path / "manifest.json").write_text("{}")
        with pytest.raises(Cancelled):
            old.publish("manifest.json", tmp_path / "manifest.json")
        assert old.finish("cancelled") == "running" and old.fail(error_code="x", error_type="system",
                                                                 error_message="x") == "running"
    row = job_row(settings, job_id)
    assert (row.status, row.attempts, row.finished_at) == ("running", 2, None)


def test_a_requeued_job_resumes_from_its_saved_state_or_starts_over_when_it_is_unusable(sqlite_settings,
                                                                                         tiny_model_dir, text_dir):
    from service import artifacts
    from service.reconciler import settle_lost

    settings = sqlite_settings.model_copy(update={"checkpoint_every_steps": 2, "checkpoint_every_s": 0})
    results = {}
    for case in ("saved", "garbage"):
        job_id = tiny_job(settings, tiny_model_dir, text_dir, steps=6)
        state = artifacts.search_state_path(settings.artifact_dir, job_id)
        claim(settings, job_id, "gpu0@host")  # attempt 1, whose worker dies
        state.parent.mkdir(parents=True, exist_ok=True)
        if case == "saved":  # what attempt 1 left when it was killed after step 4
            from consa.search.loop import run_search, save_gate_state
            from worker.runner import search_config_of

            saved = []
            run_search(search_config_of(job_row(settings, job_id).params), on_checkpoint=saved.append,
                       checkpoint_every=4)
            save_gate_state(saved[0], state)
        else:
            state.write_bytes(b"not a safetensors file")
        assert settle_lost(settings, worker="gpu0@host")["requeued"] == [job_id]
        assert state.exists()  # the requeue keeps the resume point
        assert run_job(job_id, settings, worker="gpu0@host") == "succeeded"
        events = events_of(settings, job_id)
        second = max(i for i, e in enumerate(events) if e.message.startswith("job running on"))
        results[case] = ([e.message for e in events[second:] if e.type in ("info", "warning")],
                         [e.data["step"] for e in events[second:] if e.type == "progress"
                          and e.data.get("phase") == "search"])
        assert not state.exists()  # gone with the job's end
    messages, steps = results["saved"]
    assert "resumed from step 4 (attempt 2)" in messages and steps == [5, 6], results
    messages, steps = results["garbage"]
    assert any("unusable; starting from step 0" in m for m in messages) and steps == list(range(1, 7)), results


# -- issue 21: a worker told to stop (SIGTERM, `docker stop`) hands its job back after the step it is in --
def test_a_stopping_worker_hands_its_job_back_after_the_step_and_the_next_attempt_resumes_there(
        sqlite_settings, tiny_model_dir, text_dir, monkeypatch):
    from worker import runner

    # Time-based saves only, an hour apart: the state written at the stop is the stop's own.
    settings = sqlite_settings.model_copy(update={"checkpoint_every_steps": 0, "checkpoint_every_s": 3600})
    job_id = tiny_job(settings, tiny_model_dir, text_dir, steps=6)
    real = runner.JobRun.progress

    def progress(self, record):
        real(self, record)
        if record.get("phase", "search") == "search" and record.get("step") == 3:
            runner.STOPPING.set()  # what Celery's SIGTERM handler does (worker/tasks.py), during step 3

    monkeypatch.setattr(runner.JobRun, "progress", progress)
    try:
        assert run_job(job_id, settings, worker="gpu0@host") == "queued"
    finally:
        runner.STOPPING.clear()
    monkeypatch.undo()
    row = job_row(settings, job_id)
    assert (row.status, row.worker, row.attempts) == ("queued", None, 1)
    assert run_job(job_id, settings, worker="gpu1@host") == "succeeded"
    events = events_of(settings, job_id)
    messages = [e.message for e in events]
    assert "worker stopping: the job goes back to the queue" in messages
    assert "resumed from step 3 (attempt 2)" in messages, messages
    second = max(i for i, e in enumerate(events) if e.message.startswith("job running on"))
    assert [e.data["step"] for e in events[second:] if e.type == "progress" and e.data.get("phase") == "search"] \
        == [4, 5, 6]
