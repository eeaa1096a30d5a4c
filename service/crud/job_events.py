"""A job's event log: status changes, progress, info, warnings; read oldest first."""

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.crud import PLAIN
from service.models import Job, JobEvent, utcnow

MAX_EVENT_ID = 2**31 - 1  # job_events.id is a 32-bit integer on PostgreSQL


def add_event(session: Session, *, job_pk: int, type: str, message: str, data: dict | None = None) -> None:
    session.add(JobEvent(job_pk=job_pk, type=type, message=message, data=data))


def log_event(session: Session, *, job: Job, type: str, message: str, data: dict | None = None) -> None:
    """An event from the worker; it beats the heartbeat too (export and evaluation have no steps)."""
    add_event(session, job_pk=job.pk, type=type, message=message, data=data)
    session.execute(update(Job).where(Job.pk == job.pk).values(heartbeat_at=utcnow()), execution_options=PLAIN)
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
