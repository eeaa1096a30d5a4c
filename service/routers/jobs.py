"""/v1/jobs: create, list, read and cancel allocation jobs."""

import hashlib
import json
import logging
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from sqlalchemy.exc import IntegrityError

from service import schemas
from service.crud import job_records, job_states, outbox
from service.deps import ApiKeyDep, JobDep, SessionDep, SettingsDep
from service.limits.job_size import check_limits
from service.limits.nul_bytes import NO_NUL_SCHEMA, reject_nul
from service.locations import resolve_dataset, resolve_model
from service.problems import PROBLEM_RESPONSES, ProblemError, responses
from service.queue import enqueue
from service.store import get_store

log = logging.getLogger("consa.service")
router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
QUOTA_RETRY_AFTER_S = 60  # a job takes minutes at least; asking again sooner is pointless

def _request_hash(body: schemas.JobCreate) -> str:
    # The validated body with defaults filled in: two requests that ask for the same search match.
    return hashlib.sha256(json.dumps(body.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


@router.post("", status_code=202, response_model=schemas.Job, responses=PROBLEM_RESPONSES | responses(413, 429),
             summary="Create an allocation job")
def create_job(body: schemas.JobCreate, request: Request, response: Response, session: SessionDep,
               key: ApiKeyDep, settings: SettingsDep,
               idempotency_key: Annotated[str | None, Header(max_length=255,
                                                             description="Retry-safe creation: the same key and "
                                                                         "body return the same job.")] = None):
    """Queue a search. Answers 202 with the job; poll it, or follow its events. 429 (with Retry-After)
    when the key already has its quota of queued and running jobs, or sends requests too fast."""
    reject_nul(body.model_dump(), ["body"])  # python mode: the JSON mode would mangle a lone surrogate in a key
    request_hash = _request_hash(body)
    if idempotency_key is not None:
        existing = job_records.get_job_by_idempotency_key(session, api_key_id=key.id,
                                                          idempotency_key=idempotency_key,
                                                          ttl_s=settings.idempotency_ttl_s)
        if existing is not None:
            return _replay(existing, request_hash, response)

    check_limits(settings, body)
    params = body.model_dump(exclude={"metadata"})
    params["model"] = resolve_model(settings, body.model)
    params["dataset"] = resolve_dataset(settings, body.dataset)
    # The count and the insert under the key's lock (released by create_job's commit): exact under a burst.
    job_records.lock_key_for_submit(session, api_key_id=key.id)
    active = job_records.count_active_jobs(session, api_key_id=key.id)
    if active >= settings.max_active_jobs_per_key:
        raise ProblemError(429, f"this key has {active} queued or running jobs, the most allowed "
                                f"(CONSA_MAX_ACTIVE_JOBS_PER_KEY); submit again when one has ended",
                           code="too_many_active_jobs", headers={"Retry-After": str(QUOTA_RETRY_AFTER_S)})
    try:
        job = job_records.create_job(session, api_key_id=key.id, model=body.model, params=params,
                                     meta=body.metadata, idempotency_key=idempotency_key,
                                     request_hash=request_hash)
    except IntegrityError:
        # A concurrent request with the same Idempotency-Key won the insert; answer with its job.
        session.rollback()
        existing = job_records.get_job_by_idempotency_key(session, api_key_id=key.id, idempotency_key=idempotency_key)
        return _replay(existing, request_hash, response)

    # The outbox: the row is committed first, then its id is published. If the broker is down the job
    # stays queued and unpublished, and the reconciler publishes it once the broker is back; the
    # client's 202 (and any Idempotency-Key replay) names a job that will run.
    try:
        enqueue(request.app.state.celery, job.id, settings.queue)
        outbox.mark_enqueued(session, job_id=job.id)
    except Exception as e:
        log.warning("could not publish %s now (%s); the reconciler will", job.id, type(e).__name__)
    request.app.state.metrics.jobs_created.inc()
    return schemas.Job.of(job)


def _replay(job, request_hash: str, response: Response) -> schemas.Job:
    if job.request_hash != request_hash:
        raise ProblemError(422, "this Idempotency-Key was already used with a different request body",
                           code="idempotency_key_reused")
    response.headers["Idempotent-Replayed"] = "true"
    return schemas.Job.of(job)


@router.get("", response_model=schemas.JobList, responses=PROBLEM_RESPONSES, summary="List your jobs, newest first")
def list_jobs(session: SessionDep, key: ApiKeyDep, settings: SettingsDep,
              status: Annotated[schemas.Status | None, Query()] = None,
              model: Annotated[str | None, Query(max_length=1000, json_schema_extra=NO_NUL_SCHEMA)] = None,
              limit: Annotated[int, Query(ge=1, le=100)] = 20,
              after: Annotated[str | None, Query(max_length=40, description="Last job id of the previous page "
                                                                           "(one naming no job of yours: an empty page).",
                                                 json_schema_extra=NO_NUL_SCHEMA)] = None):
    reject_nul({"model": model, "after": after}, ["query"])
    try:
        jobs, has_more = job_records.list_jobs(session, api_key_id=key.id,
                                               limit=min(limit, settings.max_page_size), after=after,
                                               status=status, model=model)
    except LookupError:  # a cursor naming no job of this key (deleted, or never one): nothing comes after it
        jobs, has_more = [], False
    data = [schemas.Job.of(j) for j in jobs]
    return schemas.JobList(data=data, has_more=has_more, first_id=data[0].id if data else None,
                           last_id=data[-1].id if data else None)


@router.get("/{job_id}", response_model=schemas.Job, responses=PROBLEM_RESPONSES, summary="Get a job")
def get_job(job: JobDep):
    return schemas.Job.of(job)


@router.post("/{job_id}/cancel", response_model=schemas.Job, responses=PROBLEM_RESPONSES, summary="Cancel a job")
def cancel_job(job: JobDep, session: SessionDep):
    """A queued job ends `cancelled` at once; a running one turns `cancel_requested` and stops at its next
    step. Cancelling a finished job changes nothing."""
    return schemas.Job.of(job_states.request_cancel(session, job=job))



@router.delete("/{job_id}", response_model=schemas.JobDeleted, responses=PROBLEM_RESPONSES | responses(409),
               summary="Delete a finished job and its artifacts")
def delete_job(job: JobDep, session: SessionDep, settings: SettingsDep):
    """Frees the job's artifacts on disk. A job that has not ended answers 409: cancel it first."""
    job_id = job.id
    if not job_records.delete_job(session, job=job):
        raise ProblemError(409, f"job {job_id} is {job.status}; cancel it and delete it once it has ended",
                           code="job_not_finished")
    try:  # after the rows: a crash leaves files (the reconciler's orphan sweep removes them), not links
        get_store(settings).delete_job(job_id)
    except OSError as e:
        log.warning("job %s deleted; its files stay for the orphan sweep: %s", job_id, e)
    return schemas.JobDeleted(id=job_id)
