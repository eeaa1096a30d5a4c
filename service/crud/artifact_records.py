"""The rows that list a job's published artifacts (name, size, sha256, media type). The files
themselves live in the artifact store: service/artifacts.py."""

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from service.crud.job_events import add_event
from service.models import Artifact, Job


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


def existing_job_ids(session: Session, *, job_ids: list[str]) -> set[str]:
    """Which of these job ids have a row (the reconciler's orphan sweep: files of the others go)."""
    found: set[str] = set()
    for i in range(0, len(job_ids), 500):
        found.update(session.scalars(select(Job.id).where(Job.id.in_(job_ids[i:i + 500]))))
    return found
