"""/v1/jobs/{id}/events: what happened to a job, as a paginated list or a server-sent events stream."""

import json
import time
from typing import Annotated

import anyio
from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from service import schemas
from service.crud import api_keys, job_events, job_records, job_states
from service.db import sessionmaker_for
from service.deps import JobDep, SessionDep, SettingsDep
from service.problems import PROBLEM_RESPONSES

router = APIRouter(prefix="/v1/jobs", tags=["events"])

POLL_S = 0.5  # how often a stream looks for new rows; the worker writes one per step
KEEPALIVE_S = 15.0  # a comment line keeps proxies from closing a quiet stream


@router.get("/{job_id}/events", response_model=schemas.EventList, summary="List or stream a job's events",
            responses=PROBLEM_RESPONSES | {200: {"content": {"text/event-stream": {}}}})
def list_events(job: JobDep, session: SessionDep, settings: SettingsDep, request: Request,
                limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                after: Annotated[int | None, Query(ge=0, description="Last event id already seen.")] = None,
                stream: Annotated[bool, Query(description="Stream as text/event-stream until the job ends.")] = False,
                accept: Annotated[str | None, Header(include_in_schema=False)] = None,
                last_event_id: Annotated[int | None, Header(include_in_schema=False)] = None):
    """Oldest first. Page with `after=<last id>`. With `stream=true` (or `Accept: text/event-stream`) the
    answer is a server-sent events stream that resumes from `Last-Event-ID` and ends once the job has ended.
    A key may hold a few streams open at once (429 beyond)."""
    if stream or (accept or "").startswith("text/event-stream"):
        start = last_event_id if last_event_id is not None else after
        release = request.app.state.stream_slots.acquire(job.api_key_id)
        # The request's session would otherwise keep its connection until the stream ends (the
        # dependency closes after the response): give it back now; each poll takes its own.
        session.close()
        # The slot is released when the stream ends, is closed by the client, or never starts.
        return StreamingResponse(_stream(settings.database_url, job.id, job.api_key_id, start, release),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                                 background=BackgroundTask(release))
    events, has_more = job_events.list_events(session, job=job, limit=limit, after=after)
    return schemas.EventList(data=[schemas.Event.of(e) for e in events], has_more=has_more)


def _poll(database_url: str, job_id: str, api_key_id: int, after: int | None):
    with sessionmaker_for(database_url)() as session:
        if not api_keys.key_is_active(session, api_key_id=api_key_id):  # revoked while streaming: stop now
            return [], True
        job = job_records.get_job(session, job_id=job_id, api_key_id=api_key_id)
        if job is None:  # deleted while streamed: nothing more will come
            return [], True
        events, _ = job_events.list_events(session, job=job, limit=1000, after=after)
        return [schemas.Event.of(e) for e in events], job_states.is_terminal(job.status)


async def _stream(database_url: str, job_id: str, api_key_id: int, after: int | None, release):
    """Polls with a short session each time: an open stream holds no database connection while it waits."""
    try:
        quiet_since = time.monotonic()
        while True:
            # Read the status before the events: a terminal status then guarantees we saw the last event.
            events, ended = await anyio.to_thread.run_sync(_poll, database_url, job_id, api_key_id, after)
            for event in events:
                after = event.id
                yield f"id: {event.id}\nevent: {event.type}\ndata: {json.dumps(event.model_dump(mode='json'))}\n\n"
            if ended and not events:
                return
            if events:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > KEEPALIVE_S:
                quiet_since = time.monotonic()
                yield ": keep-alive\n\n"
            await anyio.sleep(0 if events else POLL_S)
    finally:
        release()
