"""Database tables. The database is the source of truth for jobs; Celery only carries a job id."""

import datetime as dt

from sqlalchemy import JSON, BigInteger, DateTime, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

QUEUED, RUNNING, CANCEL_REQUESTED = "queued", "running", "cancel_requested"
SUCCEEDED, FAILED, CANCELLED = "succeeded", "failed", "cancelled"
STATUSES = (QUEUED, RUNNING, CANCEL_REQUESTED, SUCCEEDED, FAILED, CANCELLED)
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Base(DeclarativeBase):
    pass


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    prefix: Mapped[str] = mapped_column(String(16))  # shown to people to tell keys apart; not secret
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex of the whole key
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class Job(Base):
    __tablename__ = "jobs"
    # Same key + same Idempotency-Key → the same job (NULL keys never collide).
    __table_args__ = (UniqueConstraint("api_key_id", "idempotency_key", name="uq_jobs_idempotency"),)

    pk: Mapped[int] = mapped_column(Integer, primary_key=True)  # insertion order: the list cursor
    id: Mapped[str] = mapped_column(String(40), unique=True)
    api_key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id"), index=True)
    status: Mapped[str] = mapped_column(String(20), default=QUEUED, index=True)
    model: Mapped[str] = mapped_column(String(1000), index=True)
    params: Mapped[dict] = mapped_column(JSON)  # the validated request, minus metadata
    meta: Mapped[dict] = mapped_column("metadata", JSON, default=dict)
    progress: Mapped[dict | None] = mapped_column(JSON)
    error_code: Mapped[str | None] = mapped_column(String(100))
    error_message: Mapped[str | None] = mapped_column(Text)
    error_type: Mapped[str | None] = mapped_column(String(10))  # "user" or "system"
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    worker: Mapped[str | None] = mapped_column(String(255))
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # claims so far: also each attempt's token
    # Of those, attempts a stopping worker handed back (SIGTERM, a restart): they are not lost attempts,
    # so CONSA_MAX_ATTEMPTS counts attempts - handbacks.
    handbacks: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    # The outbox: when the job's id was last published to the broker (None: not yet). The reconciler
    # publishes jobs that are queued and unpublished, or whose message a live idle worker never got.
    enqueued_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))

    artifacts: Mapped[list["Artifact"]] = relationship(back_populates="job", order_by="Artifact.id")


class JobEvent(Base):
    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)  # increasing: the events cursor
    job_pk: Mapped[int] = mapped_column(ForeignKey("jobs.pk", ondelete="CASCADE"), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    type: Mapped[str] = mapped_column(String(20))  # status | progress | info | warning | error
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict | None] = mapped_column(JSON)


class Artifact(Base):
    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("job_pk", "name", name="uq_artifacts_job_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_pk: Mapped[int] = mapped_column(ForeignKey("jobs.pk", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(255))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    content_type: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    job: Mapped[Job] = relationship(back_populates="artifacts")


class Worker(Base):
    """A worker process's heartbeat: /readyz reports whether any is alive, the reconciler whether one
    sits idle while jobs wait (their messages were lost)."""

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)  # Celery hostname, e.g. gpu0@host
    started_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    heartbeat_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    idle_since: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))  # None while it runs a job
    device: Mapped[str | None] = mapped_column(String(200))  # "cpu", "cuda:NVIDIA H200": the estimate's device kind
