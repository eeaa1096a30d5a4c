"""Data access for keys, jobs, events and artifacts. Keyword-only, one session per call site.

Status changes are conditional UPDATEs (`WHERE status IN ...`), so the API cancelling a job and the
worker claiming or finishing it can race without either overwriting the other.
"""

import datetime as dt
import hashlib
import secrets

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from service.models import (CANCEL_REQUESTED, CANCELLED, FAILED, QUEUED, RUNNING, TERMINAL, ApiKey, Artifact, Job,
                            JobEvent, Worker, utcnow)

KEY_PREFIX = "consa_"
MAX_EVENT_ID = 2**31 - 1  # job_events.id is a 32-bit integer on PostgreSQL


# -- API keys ---------------------------------------------------------------------------------
def hash_key(key: str) -> str:
    # Keys are 256 random bits, so a plain sha256 is enough: there is nothing to brute-force,
    # and a fast hash keeps the per-request lookup cheap (bcrypt is for low-entropy passwords).
    return hashlib.sha256(key.encode()).hexdigest()


def create_api_key(session: Session, *, name: str) -> str:
    """Store a new key (hashed) and return it in clear: the only time it is ever visible."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(name=name, prefix=key[: len(KEY_PREFIX) + 6], key_hash=hash_key(key)))
    session.commit()
    return key


def get_api_key(session: Session, *, key: str) -> ApiKey | None:
    """The key's row, or None when it is unknown or revoked."""
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))
    return row if row is not None and row.revoked_at is None else None


def list_api_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.id)))


def revoke_api_keys(session: Session, *, name: str) -> int:
    """Revoke every active key named `name`; return how many."""
    result = session.execute(update(ApiKey).where(ApiKey.name == name, ApiKey.revoked_at.is_(None))
                             .values(revoked_at=utcnow()), execution_options={"synchronize_session": False})
    session.commit()
    return result.rowcount


# -- jobs -------------------------------------------------------------------------------------
def new_job_id() -> str:
    return "job_" + secrets.token_hex(12)


def create_job(session: Session, *, api_key_id: int, model: str, params: dict, meta: dict,
               idempotency_key: str | None = None, request_hash: str | None = None) -> Job:
    job = Job(id=new_job_id(), api_key_id=api_key_id, status=QUEUED, model=model, params=params, meta=meta,
              idempotency_key=idempotency_key, request_hash=request_hash)
    session.add(job)
    session.flush()
    add_event(session, job_pk=job.pk, type="status", message="job queued", data={"status": QUEUED})
    session.commit()
    return job


def get_job(session: Session, *, job_id: str, api_key_id: int | None = None) -> Job | None:
    """The job, or None when it does not exist or belongs to another key (callers answer 404 for both)."""
    query = select(Job).where(Job.id == job_id)
    if api_key_id is not None:
        query = query.where(Job.api_key_id == api_key_id)
    return session.scalar(query)


def get_job_by_idempotency_key(session: Session, *, api_key_id: int, idempotency_key: str,
                               ttl_s: int | None = None) -> Job | None:
    """The job created with this key, if it is younger than `ttl_s`; an expired key is released (its
    job keeps existing, the key may name a new request)."""
    job = session.scalar(select(Job).where(Job.api_key_id == api_key_id, Job.idempotency_key == idempotency_key))
    if job is not None and ttl_s is not None:
        created = job.created_at if job.created_at.tzinfo else job.created_at.replace(tzinfo=dt.timezone.utc)
        if created < utcnow() - dt.timedelta(seconds=ttl_s):
            job.idempotency_key = None
            session.commit()
            return None
    return job


def list_jobs(session: Session, *, api_key_id: int, limit: int, after: str | None = None,
              status: str | None = None, model: str | None = None) -> tuple[list[Job], bool]:
    """Newest first. `after` is the id of the last job of the previous page. Returns (jobs, has_more)."""
    query = select(Job).where(Job.api_key_id == api_key_id)
    if status:
        query = query.where(Job.status == status)
    if model:
        query = query.where(Job.model == model)
    if after:
        cursor = get_job(session, job_id=after, api_key_id=api_key_id)
        if cursor is None:
            raise LookupError(after)
        query = query.where(Job.pk < cursor.pk)
    rows = list(session.scalars(query.order_by(Job.pk.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def count_active_jobs(session: Session, *, api_key_id: int) -> int:
    """Queued, running and cancel-requested jobs of one key (its quota)."""
    return session.scalar(select(func.count()).select_from(Job).where(
        Job.api_key_id == api_key_id, Job.status.in_((QUEUED, RUNNING, CANCEL_REQUESTED))))


def count_jobs_by_status(session: Session) -> dict[str, int]:
    return dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())


# Status updates run as plain SQL (no in-session sync): callers refresh the rows they go on using.
_PLAIN = {"synchronize_session": False}


def _set_status(session: Session, *, job_pk: int, old: tuple[str, ...], new: str, _attempt: int | None = None,
                **values) -> bool:
    query = update(Job).where(Job.pk == job_pk, Job.status.in_(old))
    if _attempt is not None:
        query = query.where(Job.attempts == _attempt)
    result = session.execute(query.values(status=new, **values), execution_options=_PLAIN)
    return result.rowcount == 1


def request_cancel(session: Session, *, job: Job) -> Job:
    """A queued job is cancelled at once; a running one is asked to stop at its next step."""
    if _set_status(session, job_pk=job.pk, old=(QUEUED,), new=CANCELLED, finished_at=utcnow()):
        add_event(session, job_pk=job.pk, type="status", message="job cancelled before it started",
                  data={"status": CANCELLED})
    elif _set_status(session, job_pk=job.pk, old=(RUNNING,), new=CANCEL_REQUESTED):
        add_event(session, job_pk=job.pk, type="status", message="cancel requested; the job stops at its next step",
                  data={"status": CANCEL_REQUESTED})
    session.commit()
    session.refresh(job)
    return job


def delete_job(session: Session, *, job: Job) -> bool:
    """Delete a finished job with its events and artifact rows; False (nothing deleted) while it runs.

    Children go first and explicitly: SQLite enforces ON DELETE CASCADE only when asked to.
    """
    if job.status not in TERMINAL:
        return False
    session.execute(delete(JobEvent).where(JobEvent.job_pk == job.pk))
    session.execute(delete(Artifact).where(Artifact.job_pk == job.pk))
    session.execute(delete(Job).where(Job.pk == job.pk))
    session.commit()
    return True


def claim_job(session: Session, *, job_id: str, worker: str) -> Job | None:
    """Atomically move a queued job to running. None when another delivery already took it or it ended."""
    job = get_job(session, job_id=job_id)
    if job is None:
        return None
    now = utcnow()
    if not _set_status(session, job_pk=job.pk, old=(QUEUED,), new=RUNNING, started_at=now, heartbeat_at=now,
                       worker=worker, attempts=Job.attempts + 1):
        session.rollback()
        return None
    add_event(session, job_pk=job.pk, type="status", message=f"job running on {worker}", data={"status": RUNNING})
    session.commit()
    session.refresh(job)
    return job


def progress_message(progress: dict) -> str:
    """ "step 12/200" while searching, "evaluation 3/11" or "export 1/2" afterwards."""
    if progress.get("phase") in (None, "search"):
        return f"step {progress.get('step')}/{progress.get('total_steps')}"
    return f"{progress['phase']} {progress.get('phase_done')}/{progress.get('phase_total')}"


def record_progress(session: Session, *, job: Job, progress: dict) -> str:
    """Store the latest step metrics + an event, beat the heartbeat; return the status (for cancel checks)."""
    session.execute(update(Job).where(Job.pk == job.pk).values(progress=progress, heartbeat_at=utcnow()),
                    execution_options=_PLAIN)
    add_event(session, job_pk=job.pk, type="progress",
              message=progress_message(progress), data=progress)
    session.commit()
    return job_status(session, job_pk=job.pk)


def runs_on(session: Session, *, job_pk: int, worker: str, attempt: int | None = None) -> bool:
    """The job is running on this worker, in this attempt (not cancel-requested, ended, or handed to
    another worker, or to a later process of the same worker name)."""
    row = session.execute(select(Job.status, Job.worker, Job.attempts).where(Job.pk == job_pk)).first()
    return (row is not None and row.status == RUNNING and row.worker == worker
            and (attempt is None or row.attempts == attempt))


def is_attempt(session: Session, *, job_pk: int, attempt: int) -> bool:
    """The job is still active in this attempt (no requeue since, not ended)."""
    row = session.execute(select(Job.status, Job.attempts).where(Job.pk == job_pk)).first()
    return row is not None and row.status in (RUNNING, CANCEL_REQUESTED) and row.attempts == attempt


def job_status(session: Session, *, job_pk: int) -> str:
    return session.scalar(select(Job.status).where(Job.pk == job_pk))


def finish_job(session: Session, *, job: Job, status: str, error_code: str | None = None,
               error_message: str | None = None, error_type: str | None = None, attempt: int | None = None) -> bool:
    """Move a running (or cancel-requested) job to its terminal state, once. With `attempt`, only while
    the row is still that attempt: a worker that froze, lost its job to a requeue and woke up again
    must not end the attempt that runs now."""
    done = _set_status(session, job_pk=job.pk, old=(RUNNING, CANCEL_REQUESTED), new=status, finished_at=utcnow(),
                       error_code=error_code, error_message=error_message, error_type=error_type,
                       **({} if attempt is None else {"_attempt": attempt}))
    if done:
        message = f"job {status}" + (f": {error_message}" if error_message else "")
        data = {"status": status} | ({"error": {"code": error_code, "type": error_type}} if error_code else {})
        add_event(session, job_pk=job.pk, type="status", message=message, data=data)
    session.commit()
    return done


def mark_lost(session: Session, *, job: Job, stale_before: dt.datetime) -> bool:
    """Fail a running job whose worker stopped beating (it crashed); never touch a live one."""
    result = session.execute(
        update(Job).where(Job.pk == job.pk, Job.status.in_((RUNNING, CANCEL_REQUESTED)), Job.heartbeat_at < stale_before)
        .values(status="failed", finished_at=utcnow(), error_code="worker_lost", error_type="system",
                error_message="the worker running this job stopped; submit the job again"),
        execution_options=_PLAIN)
    if result.rowcount == 1:
        add_event(session, job_pk=job.pk, type="status", message="job failed: worker lost", data={"status": "failed"})
    session.commit()
    return result.rowcount == 1


def is_terminal(status: str) -> bool:
    return status in TERMINAL


# -- events -----------------------------------------------------------------------------------
def add_event(session: Session, *, job_pk: int, type: str, message: str, data: dict | None = None) -> None:
    session.add(JobEvent(job_pk=job_pk, type=type, message=message, data=data))


def log_event(session: Session, *, job: Job, type: str, message: str, data: dict | None = None) -> None:
    """An event from the worker; it beats the heartbeat too (export and evaluation have no steps)."""
    add_event(session, job_pk=job.pk, type=type, message=message, data=data)
    session.execute(update(Job).where(Job.pk == job.pk).values(heartbeat_at=utcnow()), execution_options=_PLAIN)
    session.commit()


def list_events(session: Session, *, job: Job, limit: int, after: int | None = None) -> tuple[list[JobEvent], bool]:
    """Oldest first, so a client polls with after=<last id it saw>. Returns (events, has_more)."""
    if after is not None and after > MAX_EVENT_ID:
        return [], False  # past every id the column can hold (and PostgreSQL would refuse the number)
    query = select(JobEvent).where(JobEvent.job_pk == job.pk)
    if after is not None:
        query = query.where(JobEvent.id > after)
    rows = list(session.scalars(query.order_by(JobEvent.id).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


# -- artifacts --------------------------------------------------------------------------------
def add_artifact(session: Session, *, job: Job, name: str, size: int, sha256: str, content_type: str) -> Artifact:
    artifact = Artifact(job_pk=job.pk, name=name, size=size, sha256=sha256, content_type=content_type)
    session.add(artifact)
    add_event(session, job_pk=job.pk, type="info", message=f"artifact {name} stored ({size} bytes)",
              data={"artifact": name, "size": size, "sha256": sha256})
    session.commit()
    return artifact


def delete_artifacts(session: Session, *, job: Job) -> None:
    session.execute(delete(Artifact).where(Artifact.job_pk == job.pk))
    session.commit()


def list_artifacts(session: Session, *, job: Job) -> list[Artifact]:
    return list(session.scalars(select(Artifact).where(Artifact.job_pk == job.pk).order_by(Artifact.id)))


def get_artifact(session: Session, *, job: Job, name: str) -> Artifact | None:
    return session.scalar(select(Artifact).where(Artifact.job_pk == job.pk, Artifact.name == name))


def fail_orphans(session: Session, *, worker: str) -> int:
    """Fail the jobs a worker left running when its process died (it runs one job at a time)."""
    jobs = list(session.scalars(select(Job).where(Job.worker == worker, Job.status.in_((RUNNING, CANCEL_REQUESTED)))))
    for job in jobs:
        _set_status(session, job_pk=job.pk, old=(RUNNING, CANCEL_REQUESTED), new="failed", finished_at=utcnow(),
                    error_code="worker_lost", error_type="system",
                    error_message="the worker running this job stopped; submit the job again")
        add_event(session, job_pk=job.pk, type="status", message="job failed: worker lost", data={"status": "failed"})
    session.commit()
    return len(jobs)


# -- the outbox, worker heartbeats and lost jobs (used by service/reconciler.py) ----------------
def mark_enqueued(session: Session, *, job_id: str) -> None:
    """Record that the job's id was published (the outbox's "sent" mark)."""
    session.execute(update(Job).where(Job.id == job_id).values(enqueued_at=utcnow()), execution_options=_PLAIN)
    session.commit()


def jobs_to_publish(session: Session, *, created_before: dt.datetime, republish_before: dt.datetime | None,
                    limit: int = 100) -> list[str]:
    """Queued jobs never published (older than `created_before`, so the request that made them had its
    chance), and, when `republish_before` is given, queued jobs last published before it."""
    unsent = (Job.enqueued_at.is_(None)) & (Job.created_at < created_before)
    due = unsent if republish_before is None else unsent | (Job.enqueued_at < republish_before)
    return list(session.scalars(select(Job.id).where(Job.status == QUEUED, due).order_by(Job.pk).limit(limit)))


def beat_worker(session: Session, *, worker: str) -> int:
    """A worker is alive: beat the jobs it runs and its own row. Returns how many jobs it runs."""
    now = utcnow()
    running = session.execute(update(Job).where(Job.worker == worker, Job.status.in_((RUNNING, CANCEL_REQUESTED)))
                              .values(heartbeat_at=now), execution_options=_PLAIN).rowcount
    row = session.get(Worker, worker)
    if row is None:
        session.add(Worker(name=worker, started_at=now, heartbeat_at=now, idle_since=None if running else now))
    else:
        row.heartbeat_at = now
        row.idle_since = None if running else (row.idle_since or now)
    session.commit()
    return running


def remove_worker(session: Session, *, worker: str) -> None:
    session.execute(delete(Worker).where(Worker.name == worker))
    session.commit()


def live_workers(session: Session, *, stale_before: dt.datetime) -> list[Worker]:
    return list(session.scalars(select(Worker).where(Worker.heartbeat_at >= stale_before).order_by(Worker.name)))


def idle_worker_exists(session: Session, *, stale_before: dt.datetime, idle_before: dt.datetime) -> bool:
    """A live worker has been idle since before `idle_before`: a message published before then is lost."""
    return session.scalar(select(func.count()).select_from(Worker).where(
        Worker.heartbeat_at >= stale_before, Worker.idle_since.is_not(None), Worker.idle_since < idle_before)) > 0


def settle_lost_jobs(session: Session, *, max_attempts: int, stale_before: dt.datetime | None = None,
                     worker: str | None = None) -> dict[str, list[str]]:
    """Jobs whose worker died (heartbeat older than `stale_before`, or every active job of `worker`,
    which just restarted): a cancel-requested one ends `cancelled`; a running one is queued again
    while it has attempts left, else it fails as `worker_lost`. Returns the job ids by outcome.

    Each change is conditional on the status, worker and staleness read here, so a worker that beats
    or finishes the job at the same moment wins and the job is left alone.
    """
    query = select(Job).where(Job.status.in_((RUNNING, CANCEL_REQUESTED)))
    if worker is not None:
        query = query.where(Job.worker == worker)
    if stale_before is not None:
        query = query.where(Job.heartbeat_at < stale_before)
    outcome = {"cancelled": [], "requeued": [], "failed": []}
    for job in list(session.scalars(query.order_by(Job.pk))):
        same = update(Job).where(Job.pk == job.pk, Job.status == job.status, Job.worker == job.worker)
        if stale_before is not None:
            same = same.where(Job.heartbeat_at < stale_before)
        if job.status == CANCEL_REQUESTED:
            values = dict(status=CANCELLED, finished_at=utcnow())
            kind, message = "cancelled", f"job cancelled: its worker {job.worker} stopped"
        elif job.attempts < max_attempts:
            # Partial artifacts of the lost attempt go; the caller removes their files.
            values = dict(status=QUEUED, worker=None, progress=None, started_at=None, enqueued_at=None)
            kind, message = "requeued", (f"worker {job.worker} lost; job queued again "
                                         f"(attempt {job.attempts + 1} of {max_attempts})")
        else:
            values = dict(status=FAILED, finished_at=utcnow(), error_code="worker_lost", error_type="system",
                          error_message=f"the worker running this job stopped ({job.attempts} attempts); "
                                        "submit the job again")
            kind, message = "failed", "job failed: worker lost"
        if session.execute(same.values(**values), execution_options=_PLAIN).rowcount != 1:
            session.rollback()
            continue
        if kind == "requeued":
            session.execute(delete(Artifact).where(Artifact.job_pk == job.pk))
        add_event(session, job_pk=job.pk, type="status", message=message, data={"status": values["status"]})
        session.commit()
        outcome[kind].append(job.id)
    return outcome
