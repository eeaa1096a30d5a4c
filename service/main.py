"""The FastAPI app. `create_app()` builds it from settings; `uvicorn service.main:app` serves the environment's."""

import asyncio
import contextlib
from importlib.metadata import PackageNotFoundError, version

from fastapi import FastAPI, Request
from starlette.routing import compile_path

from service import dashboard, problems, reconciler
from service.db import configure_pool
from service.limits.middleware import BodySizeLimit, ConcurrencyLimit
from service.limits.per_key import RateLimiter, StreamSlots
from service.metrics import Metrics
from service.queue import make_celery
from service.routers import artifacts, estimate, events, health, jobs
from service.settings import Settings, get_settings

try:
    VERSION = version("consa")  # not `import consa`: that would load torch into the API process
except PackageNotFoundError:
    VERSION = "0.0.0"

DESCRIPTION = """Learn which attention units of a pretrained LLM can switch to sliding-window attention.

Submit an allocation job, follow its progress and events, download its manifest, gates and hybrid
checkpoint. Authenticate with `Authorization: Bearer <key>` (create one with `consa keys create NAME`).
Errors are RFC 9457 `application/problem+json`."""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_pool(settings.db_pool_size, settings.db_max_overflow)
    app = FastAPI(title="consa allocation service", version=VERSION, description=DESCRIPTION, lifespan=_lifespan)
    app.state.settings = settings
    app.state.celery = make_celery(settings)
    app.state.metrics = Metrics(settings.database_url)
    app.state.rate_limiter = RateLimiter(settings.rate_limit_per_minute)
    app.state.stream_slots = StreamSlots(settings.max_streams_per_key)
    # Innermost, so that a too-large streamed body raises straight into FastAPI's body reading.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.middleware("http")(app.state.metrics.middleware)
    app.middleware("http")(_allow_every_method)
    # Outermost: a request waits here, before it holds a thread or a database connection.
    app.add_middleware(ConcurrencyLimit, limit=settings.db_pool_size + settings.db_max_overflow)
    problems.install(app)
    for module in (estimate, jobs, events, artifacts, health, dashboard):
        app.include_router(module.router)
    app.openapi = lambda: _openapi(app)
    return app


async def _allow_every_method(request: Request, call_next):
    """A 405's Allow header names every documented method of the path: Starlette's names only those of
    the first route that matched (GET /v1/jobs/{id} but not DELETE /v1/jobs/{id})."""
    response = await call_next(request)
    if response.status_code == 405:
        matches = [(path, ms) for path, regex, ms in _path_methods(request.app) if regex.match(request.url.path)]
        # A fixed path (/v1/jobs/estimate) is its own resource, not an instance of /v1/jobs/{job_id}.
        fixed = [(path, ms) for path, ms in matches if "{" not in path]
        methods = {m.upper() for _, ms in (fixed or matches) for m in ms}
        if methods:
            response.headers["Allow"] = ", ".join(sorted(methods))
    return response


def _path_methods(app: FastAPI) -> list:
    if not hasattr(app.state, "path_methods"):
        app.state.path_methods = [(path, compile_path(path)[0], list(ops)) for path, ops in app.openapi()["paths"].items()]
    return app.state.path_methods


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI):
    """The reconciler runs beside the API for as long as it serves (service/reconciler.py)."""
    settings = app.state.settings
    task = None
    if settings.reconcile_interval_s > 0:
        task = asyncio.create_task(reconciler.run_forever(settings, app.state.celery))
    try:
        yield
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _openapi(app: FastAPI) -> dict:
    """FastAPI's document, with error bodies declared under their real media type, problem+json."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        _state_limits(schema, app.state.settings)
        for path in schema["paths"].values():
            for operation in path.values():
                for status, response in operation.get("responses", {}).items():
                    content = response.get("content", {})
                    if status.startswith(("4", "5")) and "application/problem+json" in content:
                        content["application/problem+json"] = content.pop("application/json", {})
        app.openapi_schema = schema
    return app.openapi_schema


def _state_limits(schema: dict, settings: Settings) -> None:
    """This server's bounds on a job (CONSA_MAX_STEPS, _SEQ_LEN, _BATCH_SIZE) as the request schema's maxima,
    so a client (or schemathesis) knows a schema-valid request is within them; a default above a bound is
    the bound on this server. The product bound
    (CONSA_MAX_TOKENS_PER_JOB) and the metadata's byte size are not expressible in JSON Schema."""
    fields = {"steps": settings.max_steps, "seq_len": settings.max_seq_len, "batch_size": settings.max_batch_size,
              "duo_steps": settings.max_steps}
    properties = schema.get("components", {}).get("schemas", {}).get("JobCreate", {}).get("properties", {})
    for name, bound in fields.items():
        prop = properties.get(name, {})
        for branch in [prop, *prop.get("anyOf", [])]:
            if branch.get("type") == "integer":
                branch["maximum"] = min(branch.get("maximum", bound), bound)
        if isinstance(prop.get("default"), int) and prop["default"] > bound:
            prop["default"] = bound  # a field left out gets the bound here (limits.job_size.check_limits)


def __getattr__(name):
    # `uvicorn service.main:app` without building an app (and reading settings) at import time.
    if name == "app":
        return create_app()
    raise AttributeError(name)
