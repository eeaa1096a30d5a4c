"""Job rows: create, read, list, count and delete. Their status changes: job_states."""

import datetime as dt
import secrets

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from service.crud.job_events import add_event
from service.models import CANCEL_REQUESTED, QUEUED, RUNNING, TERMINAL, ApiKey, Artifact, Job, JobEvent, utcnow


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


def lock_key_for_submit(session: Session, *, api_key_id: int) -> None:
    """Hold the key's row until this transaction ends, so that counting the key's active jobs and inserting
    its new one cannot interleave with another submit of the same key (the quota is exact under concurrent
    submits). PostgreSQL: SELECT ... FOR UPDATE on the key's row. SQLite: a write to the row, which takes
    the database's one write lock (waited for, up to the busy timeout) before the count reads."""
    if session.get_bind().dialect.name == "sqlite":
        session.execute(update(ApiKey).where(ApiKey.id == api_key_id).values(name=ApiKey.name),
                        execution_options={"synchronize_session": False})
    else:
        session.execute(select(ApiKey.id).where(ApiKey.id == api_key_id).with_for_update())


def count_active_jobs(session: Session, *, api_key_id: int) -> int:
    """Queued, running and cancel-requested jobs of one key (its quota)."""
    return session.scalar(select(func.count()).select_from(Job).where(
        Job.api_key_id == api_key_id, Job.status.in_((QUEUED, RUNNING, CANCEL_REQUESTED))))


def count_jobs_by_status(session: Session) -> dict[str, int]:
    return dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())


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
