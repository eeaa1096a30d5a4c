"""What one key may ask of the service: job size, metadata size, request rate, open streams (the body size
is BodySizeLimit, below).

The bounds are settings (service/settings.py), so an operator with bigger GPUs raises them; the
defaults refuse a job of days. Breaking one is a 4xx problem document, never a 500.
"""

import json
import threading
import time
from collections import defaultdict


from fastapi import HTTPException

from service.problems import ProblemError, field_error
from service.settings import Settings


# What reject_nul enforces, as the API's schema states it for a query string (json_schema_extra: the
# check itself stays reject_nul's, so the error keeps its code).
NO_NUL_SCHEMA = {"pattern": "^[^\\x00]*$"}


def reject_nul(value, loc: list) -> None:
    """A NUL byte is in no valid path, id or label, and PostgreSQL cannot store one in text: 422."""
    if isinstance(value, str):
        if "\x00" in value:
            raise field_error(422, loc, "must not contain a NUL byte", "invalid_character")
    elif isinstance(value, dict):
        for k, v in value.items():
            reject_nul(k, loc)
            reject_nul(v, [*loc, k])
    elif isinstance(value, list):
        for i, v in enumerate(value):
            reject_nul(v, [*loc, i])


def check_limits(settings: Settings, body) -> None:
    """The job's size against the server's bounds: each of steps, seq_len, batch_size, their product
    (training tokens), and the metadata's JSON size."""
    for field, bound in (("steps", settings.max_steps), ("seq_len", settings.max_seq_len),
                         ("batch_size", settings.max_batch_size)):
        if getattr(body, field) > bound:
            raise field_error(422, ["body", field], f"at most {bound} on this server "
                                                    f"(CONSA_MAX_{field.upper()})", "limit_exceeded")
    tokens = body.steps * body.seq_len * body.batch_size
    if tokens > settings.max_tokens_per_job:
        raise field_error(422, ["body", "steps"], f"steps x seq_len x batch_size = {tokens} training tokens; "
                                                  f"this server runs at most {settings.max_tokens_per_job} per job "
                                                  "(CONSA_MAX_TOKENS_PER_JOB)", "limit_exceeded")
    size = len(json.dumps(body.metadata, ensure_ascii=False).encode())
    if size > settings.max_metadata_bytes:
        raise field_error(422, ["body", "metadata"], f"{size} bytes as JSON; at most {settings.max_metadata_bytes}",
                          "metadata_too_large")


class RateLimiter:
    """A token bucket per key: `per_minute` requests a minute, bursts up to a minute's worth. Per API
    process (a deployment with N API processes allows N times as much)."""

    def __init__(self, per_minute: int):
        self.per_minute = per_minute
        self._buckets: dict[int, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, key_id: int) -> None:
        if self.per_minute <= 0:
            return
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key_id, (float(self.per_minute), now))
            tokens = min(float(self.per_minute), tokens + (now - last) * self.per_minute / 60)
            if tokens < 1:
                self._buckets[key_id] = (tokens, now)
                wait = int((1 - tokens) * 60 / self.per_minute) + 1
                raise ProblemError(429, f"more than {self.per_minute} requests a minute with this key; slow down",
                                   code="rate_limited", headers={"Retry-After": str(wait)})
            self._buckets[key_id] = (tokens - 1, now)


class StreamSlots:
    """Open event streams per key (per API process)."""

    def __init__(self, per_key: int):
        self.per_key = per_key
        self._open: dict[int, int] = defaultdict(int)
        self._lock = threading.Lock()

    def acquire(self, key_id: int):
        """Take a slot; returns its release function, which may be called any number of times."""
        with self._lock:
            if self._open[key_id] >= self.per_key:
                raise ProblemError(429, f"this key already has {self.per_key} open event streams "
                                        "(CONSA_MAX_STREAMS_PER_KEY); close one or page with ?after=",
                                   code="too_many_streams", headers={"Retry-After": "5"})
            self._open[key_id] += 1
        released = threading.Event()

        def release() -> None:
            with self._lock:
                if not released.is_set():
                    released.set()
                    self._open[key_id] -= 1

        return release

    def open(self, key_id: int) -> int:
        return self._open.get(key_id, 0)


class BodySizeLimit:
    """ASGI middleware: a request body over `max_bytes` is refused with a 413 problem document, at once
    when its Content-Length says so, else as soon as the streamed bytes pass the limit."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        detail = f"the request body is larger than {self.max_bytes} bytes"
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            from starlette.requests import Request

            from service.problems import problem_response

            response = problem_response(Request(scope, receive), 413, detail, code="request_too_large")
            return await response(scope, receive, send)
        seen = 0

        async def counted_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                # FastAPI re-raises its own HTTPException from reading the body; the handlers make it
                # a problem document.
                raise HTTPException(413, detail)
            return message

        await self.app(scope, counted_receive, send)


class ConcurrencyLimit:
    """ASGI middleware: at most `limit` requests inside the app at once; the rest wait here, holding
    nothing. FastAPI takes a request's database session before the route runs, so without this 200
    concurrent requests would ask the pool for 200 connections and time out on it (500s). An event
    stream gives its slot back once its headers are sent: it polls with its own short sessions."""

    def __init__(self, app, limit: int):
        import anyio

        self.app, self.semaphore = app, anyio.Semaphore(limit)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        await self.semaphore.acquire()
        held = True

        def release() -> None:
            nonlocal held
            if held:
                held = False
                self.semaphore.release()

        async def send_and_release(message):
            if message["type"] == "http.response.start" and \
                    dict(message.get("headers", [])).get(b"content-type", b"").startswith(b"text/event-stream"):
                release()
            await send(message)

        try:
            await self.app(scope, receive, send_and_release)
        finally:
            release()
