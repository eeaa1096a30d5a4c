"""The outbox: a job's row is committed first and its id published after; these say which queued
jobs still need (re)publishing. service/reconciler.py drains it."""

import datetime as dt

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.crud import PLAIN
from service.models import QUEUED, Job, utcnow


def mark_enqueued(session: Session, *, job_id: str) -> None:
    """Record that the job's id was published (the outbox's "sent" mark)."""
    session.execute(update(Job).where(Job.id == job_id).values(enqueued_at=utcnow()), execution_options=PLAIN)
    session.commit()


def mark_unsent(session: Session, *, job_id: str) -> None:
    """A queued job's message was taken by a worker that may not run it (it is stopping): send it again
    on the reconciler's next pass, to whichever worker is there then."""
    session.execute(update(Job).where(Job.id == job_id, Job.status == QUEUED).values(enqueued_at=None),
                    execution_options=PLAIN)
    session.commit()


def jobs_to_publish(session: Session, *, created_before: dt.datetime, republish_before: dt.datetime | None,
                    limit: int = 100) -> list[str]:
    """Queued jobs never published (older than `created_before`, so the request that made them had its
    chance), and, when `republish_before` is given, queued jobs last published before it."""
    unsent = (Job.enqueued_at.is_(None)) & (Job.created_at < created_before)
    due = unsent if republish_before is None else unsent | (Job.enqueued_at < republish_before)
    return list(session.scalars(select(Job.id).where(Job.status == QUEUED, due).order_by(Job.pk).limit(limit)))
