"""The job state machine. Every change is a conditional UPDATE on the status it leaves, so the API
and the workers can race without either overwriting the other:

    queued ──claim──► running ──finish──► succeeded | failed | cancelled
      │                  │  └──cancel──► cancel_requested ──finish──► cancelled
      └──cancel──► cancelled
    running, cancel_requested whose worker died: queued again (attempts left), failed (worker_lost),
    or cancelled (it was cancel_requested)
    running whose worker is told to stop (SIGTERM): handed back, queued again; not a lost attempt
"""

import datetime as dt

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from service.crud import PLAIN
from service.crud.job_events import add_event
from service.crud.job_records import get_job
from service.models import CANCEL_REQUESTED, CANCELLED, FAILED, QUEUED, RUNNING, TERMINAL, Artifact, Job, utcnow


def _set_status(session: Session, *, job_pk: int, old: tuple[str, ...], new: str, _attempt: int | None = None,
                **values) -> bool:
    query = update(Job).where(Job.pk == job_pk, Job.status.in_(old))
    if _attempt is not None:
        query = query.where(Job.attempts == _attempt)
    result = session.execute(query.values(status=new, **values), execution_options=PLAIN)
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
        execution_options=PLAIN)
    if result.rowcount == 1:
        add_event(session, job_pk=job.pk, type="status", message="job failed: worker lost", data={"status": "failed"})
    session.commit()
    return result.rowcount == 1


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
        elif lost_attempts(job) < max_attempts:
            # Partial artifacts of the lost attempt go; the caller removes their files.
            values = dict(status=QUEUED, worker=None, progress=None, started_at=None, enqueued_at=None)
            kind, message = "requeued", (f"worker {job.worker} lost; job queued again "
                                         f"(attempt {lost_attempts(job) + 1} of {max_attempts})")
        else:
            values = dict(status=FAILED, finished_at=utcnow(), error_code="worker_lost", error_type="system",
                          error_message=f"the worker running this job stopped ({lost_attempts(job)} attempts); "
                                        "submit the job again")
            kind, message = "failed", "job failed: worker lost"
        if session.execute(same.values(**values), execution_options=PLAIN).rowcount != 1:
            session.rollback()
            continue
        if kind == "requeued":
            session.execute(delete(Artifact).where(Artifact.job_pk == job.pk))
        add_event(session, job_pk=job.pk, type="status", message=message, data={"status": values["status"]})
        session.commit()
        outcome[kind].append(job.id)
    return outcome


def lost_attempts(job: Job) -> int:
    """Attempts that count against CONSA_MAX_ATTEMPTS: every claim but those a stopping worker handed back."""
    return job.attempts - (job.handbacks or 0)


def hand_back_job(session: Session, *, job: Job, attempt: int) -> bool:
    """A worker told to stop (SIGTERM: a restart, `docker stop`) gives its running job back to the queue
    (the search state it saved stays, the next attempt resumes from it). Unlike a lost worker's job, this
    attempt does not count against CONSA_MAX_ATTEMPTS. Only the attempt that runs the job can hand it back."""
    done = _set_status(session, job_pk=job.pk, old=(RUNNING,), new=QUEUED, _attempt=attempt, worker=None,
                       progress=None, started_at=None, enqueued_at=None, handbacks=Job.handbacks + 1)
    if done:
        session.execute(delete(Artifact).where(Artifact.job_pk == job.pk))
        add_event(session, job_pk=job.pk, type="status",
                  message=f"worker {job.worker} stopping; job queued again (handed back: not a lost attempt)",
                  data={"status": QUEUED, "handed_back": True})
    session.commit()
    return done


# -- reads of the status ------------------------------------------------------------------------
def job_status(session: Session, *, job_pk: int) -> str:
    return session.scalar(select(Job.status).where(Job.pk == job_pk))


def is_terminal(status: str) -> bool:
    return status in TERMINAL


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
