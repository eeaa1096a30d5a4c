"""Typed dependencies: route signatures say `session: SessionDep, key: ApiKeyDep` and nothing more."""

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from service.crud import api_keys, job_records
from service.db import sessionmaker_for
from service.models import ApiKey, Job
from service.problems import ProblemError
from service.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_session(settings: SettingsDep) -> Iterator[Session]:
    with sessionmaker_for(settings.database_url)() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]

_bearer = HTTPBearer(auto_error=False, description="An API key from `consa keys create NAME`.")


def get_api_key(request: Request, session: SessionDep,
                credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> ApiKey:
    unauthorized = {"WWW-Authenticate": "Bearer"}
    if credentials is None:
        raise ProblemError(401, "send an API key: Authorization: Bearer <key>", code="unauthorized",
                           headers=unauthorized)
    key = api_keys.get_api_key(session, key=credentials.credentials)
    if key is None:
        raise ProblemError(401, "unknown or revoked API key", code="unauthorized", headers=unauthorized)
    request.app.state.rate_limiter.take(key.id)
    return key


ApiKeyDep = Annotated[ApiKey, Depends(get_api_key)]


def get_owned_job(session: SessionDep, key: ApiKeyDep,
                  job_id: Annotated[str, Path(max_length=40, description="The job's id, `job_...`.")]) -> Job:
    # Another key's job answers exactly like a missing one, so ids leak nothing. A NUL byte is in no
    # job id (and PostgreSQL refuses it in a query), so such an id is simply not found.
    job = None if "\x00" in job_id else job_records.get_job(session, job_id=job_id, api_key_id=key.id)
    if job is None:
        raise ProblemError(404, f"no job {job_id}", code="job_not_found")
    return job


JobDep = Annotated[Job, Depends(get_owned_job)]
