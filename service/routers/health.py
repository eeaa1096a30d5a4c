"""Liveness, readiness and Prometheus metrics. No authentication: probes and scrapers have no keys."""

import datetime as dt
import os

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from service import schemas
from service.crud import heartbeats
from service.db import engine_for, sessionmaker_for
from service.deps import SettingsDep
from service.models import utcnow
from service.settings import Settings
from service.store import get_store

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=schemas.Health, summary="The API process is up")
def healthz():
    return schemas.Health(status="ok")


@router.get("/readyz", response_model=schemas.Health,
            summary="The database and the broker are reachable, a worker is alive, the artifact store has room",
            responses={503: {"model": schemas.Health}})
def readyz(request: Request, settings: SettingsDep):
    """503 when the database or the broker cannot be reached, no worker has beaten its heartbeat
    for `CONSA_STALE_AFTER_S` (jobs would be accepted but wait), or the artifact store has less free
    space than `CONSA_MIN_FREE_DISK_MB` (jobs would fail)."""
    checks = {"database": _check_database(settings.database_url), "broker": _check_broker(request.app.state.celery),
              "worker": _check_worker(settings), "artifacts": _check_artifacts(settings)}
    ok = all(v == "ok" for v in checks.values())
    body = schemas.Health(status="ok" if ok else "unavailable", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


def _check_database(url: str) -> str:
    try:
        with engine_for(url).connect() as conn:
            conn.execute(text("SELECT 1"))
        return "ok"
    except Exception as e:
        return f"error: {type(e).__name__}"


def _check_worker(settings: Settings) -> str:
    try:
        stale_before = utcnow() - dt.timedelta(seconds=settings.stale_after_s)
        with sessionmaker_for(settings.database_url)() as session:
            alive = heartbeats.live_workers(session, stale_before=stale_before)
        return "ok" if alive else f"error: no worker has beaten its heartbeat in {settings.stale_after_s}s"
    except Exception as e:
        return f"error: {type(e).__name__}"


def _check_artifacts(settings: Settings) -> str:
    """The local store: its disk has room. The s3 store: the bucket answers (a worker's scratch disk is
    its own; the API writes nothing locally)."""
    if settings.artifact_store != "s3":
        return _check_disk(settings)
    try:
        get_store(settings).check()
        return "ok"
    except OSError as e:
        return f"error: {e.strerror or type(e).__name__}"


def _check_disk(settings: Settings) -> str:
    """The artifact store takes writes: free space at least CONSA_MIN_FREE_DISK_MB (statvfs, as a
    non-root writer sees it). Says how much is free, never where."""
    if settings.min_free_disk_mb <= 0:
        return "ok"
    try:
        stat = os.statvfs(settings.artifact_dir)
    except OSError as e:
        return f"error: {e.strerror or type(e).__name__}"
    free_mb = stat.f_bavail * stat.f_frsize // 2**20
    if free_mb < settings.min_free_disk_mb:
        return f"error: the artifact store has {free_mb} MB free, under CONSA_MIN_FREE_DISK_MB={settings.min_free_disk_mb}"
    return "ok"


def _check_broker(celery) -> str:
    try:
        with celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=3)
        return "ok"
    except Exception as e:
        return f"error: {type(e).__name__}"


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
def metrics(request: Request):
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
