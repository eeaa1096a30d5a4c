"""The FastAPI app. `create_app()` builds it from settings; `uvicorn service.main:app` serves the environment's."""

from importlib.metadata import PackageNotFoundError, version

from fastapi import FastAPI

from service import dashboard, problems
from service.metrics import Metrics
from service.queue import make_celery
from service.routers import artifacts, events, health, jobs
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
    app = FastAPI(title="consa allocation service", version=VERSION, description=DESCRIPTION)
    app.state.settings = settings
    app.state.celery = make_celery(settings)
    app.state.metrics = Metrics(settings.database_url)
    app.middleware("http")(app.state.metrics.middleware)
    problems.install(app)
    for module in (jobs, events, artifacts, health, dashboard):
        app.include_router(module.router)
    app.openapi = lambda: _openapi(app)
    return app


def _openapi(app: FastAPI) -> dict:
    """FastAPI's document, with error bodies declared under their real media type, problem+json."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for path in schema["paths"].values():
            for operation in path.values():
                for status, response in operation.get("responses", {}).items():
                    content = response.get("content", {})
                    if status.startswith(("4", "5")) and "application/problem+json" in content:
                        content["application/problem+json"] = content.pop("application/json", {})
        app.openapi_schema = schema
    return app.openapi_schema


def __getattr__(name):
    # `uvicorn service.main:app` without building an app (and reading settings) at import time.
    if name == "app":
        return create_app()
    raise AttributeError(name)
