"""The reconciler: the database is the truth, the broker only a delivery channel that may lose things.

Every `reconcile_interval_s` (10 s) the API process:
1. settles jobs whose worker died, whatever its name: a `running` job with no heartbeat for
   `stale_after_s` (60 s; live workers beat every 10 s, see worker/tasks.py) is queued again while it
   has attempts left (`max_attempts`, 2; its partial artifacts go, its saved search state stays and
   the next attempt resumes from it, see worker/runner.py), else failed as `worker_lost`; a
   `cancel_requested` one ends `cancelled`;
2. publishes the outbox: `queued` jobs never published (the broker was down when they were
   submitted), and `queued` jobs published more than `requeue_after_s` (60 s) ago while a live worker
   has sat idle for as long (their message was lost, e.g. by a Redis without AOF). A duplicate message
   is harmless: the worker claims the row with a conditional UPDATE, and only one claim wins;
3. every `orphan_sweep_interval_s` (1 h), removes the artifact store's files of jobs without a row and
   aborts stale multipart uploads (sweep_orphans).

It runs in the API's lifespan (so `consa serve`, the embedded default, has it too). Several API
processes may run it at once: every change is a conditional UPDATE, and duplicates are harmless.
A job whose worker dies is therefore settled within stale_after_s + reconcile_interval_s (~70 s), and
a lost message is re-sent within requeue_after_s + reconcile_interval_s (~70 s) of a worker being idle.
"""

import datetime as dt
import logging
import re

import anyio
from celery import Celery

from service.crud import artifact_records, heartbeats, job_states, outbox
from service.db import sessionmaker_for
from service.models import utcnow
from service.queue import enqueue
from service.settings import Settings
from service.store import get_store

log = logging.getLogger("consa.reconciler")
JOB_ID = re.compile(r"job_[0-9a-f]{24}")  # service.crud.job_records.new_job_id

# A job the API just created is published by that request; the outbox leaves it alone this long.
PUBLISH_GRACE_S = 5


def settle_lost(settings: Settings, *, worker: str | None = None) -> dict[str, list[str]]:
    """Step 1, also called by a worker at start for the jobs its previous process left (worker=its name)."""
    stale_before = None if worker else utcnow() - dt.timedelta(seconds=settings.stale_after_s)
    with sessionmaker_for(settings.database_url)() as session:
        outcome = job_states.settle_lost_jobs(session, max_attempts=settings.max_attempts,
                                              stale_before=stale_before, worker=worker)
    store = get_store(settings)
    for job_id in outcome["requeued"]:
        # The lost attempt's partial artifacts go; its search state stays for the next attempt to resume from.
        try:
            store.delete_job(job_id, keep_search_state=True)
        except OSError:  # a broken store must not stop the pass; the next attempt overwrites what it publishes
            log.warning("could not remove the partial artifacts of %s", job_id)
    for job_id in outcome["failed"] + outcome["cancelled"]:  # ended: no attempt will resume from it
        try:
            store.delete_state(job_id)
        except OSError:  # a broken store must not stop the pass; the job's status is what counts
            log.warning("could not remove the search state of %s", job_id)
    for kind, ids in outcome.items():
        if ids:
            log.warning("worker lost: %s %s", kind, ", ".join(ids))
    return outcome


def publish_outbox(settings: Settings, celery: Celery) -> list[str]:
    """Step 2. Returns the ids published; stops at the first broker error (the next pass retries)."""
    now = utcnow()
    stale_before = now - dt.timedelta(seconds=settings.stale_after_s)
    waited = now - dt.timedelta(seconds=settings.requeue_after_s)
    published = []
    with sessionmaker_for(settings.database_url)() as session:
        idle = heartbeats.idle_worker_exists(session, stale_before=stale_before, idle_before=waited)
        due = outbox.jobs_to_publish(session, created_before=now - dt.timedelta(seconds=PUBLISH_GRACE_S),
                                   republish_before=waited if idle else None)
        for job_id in due:
            try:
                enqueue(celery, job_id, settings.queue)
            except Exception as e:
                log.warning("broker unavailable (%s); %d job(s) wait for the next pass", type(e).__name__,
                            len(due) - len(published))
                break
            outbox.mark_enqueued(session, job_id=job_id)
            published.append(job_id)
    if published:
        log.info("published %d queued job(s): %s", len(published), ", ".join(published))
    return published


def sweep_orphans(settings: Settings) -> dict[str, list[str]]:
    """Step 3, every `orphan_sweep_interval_s` (1 h): remove the stored files of jobs that have no row (a
    deletion that crashed between the row and the files, an attempt that wrote after its job was deleted)
    and abort multipart uploads older than `s3_stale_upload_s` (a worker died mid-upload: the bucket
    would keep their parts, and bill them, forever). The store must belong to consa alone (its prefix)."""
    store = get_store(settings)
    # Only names a job id can have: whatever else lies in the folder or under the prefix is not ours to remove.
    stored = {job_id: t for job_id, t in store.job_ids() if JOB_ID.fullmatch(job_id)}
    with sessionmaker_for(settings.database_url)() as session:
        known = artifact_records.existing_job_ids(session, job_ids=list(stored))
    orphans = sorted(set(stored) - known)
    for job_id in orphans:
        store.delete_job(job_id)
    aborted = store.abort_stale_uploads(settings.s3_stale_upload_s)
    if orphans or aborted:
        log.warning("orphan sweep: removed the files of %d job(s) without a row (%s), aborted %d stale upload(s)",
                    len(orphans), ", ".join(orphans), len(aborted))
    return {"orphans": orphans, "aborted_uploads": aborted}


def reconcile_once(settings: Settings, celery: Celery) -> None:
    settle_lost(settings)
    publish_outbox(settings, celery)


async def run_forever(settings: Settings, celery: Celery) -> None:
    """The lifespan task: one pass per interval; a failed pass (database down) is logged and retried.
    The orphan sweep runs once per `orphan_sweep_interval_s`, the first one an interval after the start."""
    next_sweep = anyio.current_time() + settings.orphan_sweep_interval_s
    while True:
        try:
            await anyio.to_thread.run_sync(reconcile_once, settings, celery)
        except Exception:
            log.exception("reconciler pass failed; retrying in %ss", settings.reconcile_interval_s)
        if settings.orphan_sweep_interval_s > 0 and anyio.current_time() >= next_sweep:
            next_sweep = anyio.current_time() + settings.orphan_sweep_interval_s
            try:
                await anyio.to_thread.run_sync(sweep_orphans, settings)
            except Exception:
                log.exception("orphan sweep failed; next in %ss", settings.orphan_sweep_interval_s)
        await anyio.sleep(settings.reconcile_interval_s)
