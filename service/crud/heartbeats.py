"""Signs of life: a job's progress (each search step beats its heartbeat), a worker's own beat, and
which workers are alive or idle (/readyz and the reconciler read them)."""

import datetime as dt

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from service.crud import PLAIN
from service.crud.job_events import add_event
from service.crud.job_states import job_status
from service.models import CANCEL_REQUESTED, RUNNING, Job, Worker, utcnow


def progress_message(progress: dict) -> str:
    """ "step 12/200" while searching, "evaluation 3/11" or "export 1/2" afterwards."""
    if progress.get("phase") in (None, "search"):
        return f"step {progress.get('step')}/{progress.get('total_steps')}"
    return f"{progress['phase']} {progress.get('phase_done')}/{progress.get('phase_total')}"


def record_progress(session: Session, *, job: Job, progress: dict) -> str:
    """Store the latest step metrics + an event, beat the heartbeat; return the status (for cancel checks)."""
    session.execute(update(Job).where(Job.pk == job.pk).values(progress=progress, heartbeat_at=utcnow()),
                    execution_options=PLAIN)
    add_event(session, job_pk=job.pk, type="progress",
              message=progress_message(progress), data=progress)
    session.commit()
    return job_status(session, job_pk=job.pk)


def beat_worker(session: Session, *, worker: str, job: tuple[int, int] | None = None, device: str | None = None) -> int:
    """A worker is alive: beat its own row and the one job its process runs now, `job` = (pk, attempt),
    only while that attempt still holds it. Never every job that names the worker: an attempt that died
    while its process lived on (a database outage broke it) must go stale for the reconciler to settle
    it. Returns 1 when it beat a job, else 0."""
    now = utcnow()
    running = 0
    if job is not None:
        pk, attempt = job
        running = session.execute(update(Job).where(Job.pk == pk, Job.worker == worker, Job.attempts == attempt,
                                                    Job.status.in_((RUNNING, CANCEL_REQUESTED)))
                                  .values(heartbeat_at=now), execution_options=PLAIN).rowcount
    row = session.get(Worker, worker)
    if row is None:
        session.add(Worker(name=worker, started_at=now, heartbeat_at=now, idle_since=None if job else now,
                           device=device))
    else:
        row.heartbeat_at = now
        row.idle_since = None if job else (row.idle_since or now)
        if device is not None:
            row.device = device
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
