"""The committed openapi.yaml matches the app, and the Alembic migrations match the models, on SQLite
and on PostgreSQL."""

from pathlib import Path

import sqlalchemy as sa
import yaml
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from service.migrate import upgrade
from service.models import Base
from service.openapi import openapi_yaml
from service_fixtures import POSTGRES_URL, create_database, drop_database

ROOT = Path(__file__).resolve().parent.parent


def test_openapi_yaml_is_up_to_date():
    committed = (ROOT / "openapi.yaml").read_text()
    assert committed == openapi_yaml(), "openapi.yaml is stale: run `python -m service.openapi > openapi.yaml`"
    spec = yaml.safe_load(committed)
    paths = spec["paths"]
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel", "/v1/jobs/{job_id}/events",
            "/v1/jobs/{job_id}/artifacts", "/v1/jobs/{job_id}/artifacts/{name}", "/healthz", "/readyz",
            "/metrics"} <= set(paths)
    assert "application/problem+json" in paths["/v1/jobs"]["post"]["responses"]["422"]["content"]


def _assert_migrated(url: str) -> None:
    upgrade(url)
    upgrade(url)  # a second run (every `consa serve` start) is a no-op
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert diff == [], f"models and migrations differ; write a migration: {diff}"


def test_migrations_match_models_on_sqlite(tmp_path):
    _assert_migrated(f"sqlite:///{tmp_path / 'fresh' / 'consa.db'}")


def test_migrations_match_models_on_postgres():
    url, name = create_database(POSTGRES_URL)
    try:
        _assert_migrated(url)
    finally:
        from service.db import engine_for

        engine_for(url).dispose()  # the migration's pooled connection would block DROP DATABASE
        drop_database(POSTGRES_URL, name)
