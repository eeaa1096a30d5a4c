"""All service settings in one place, read from CONSA_* environment variables."""

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _default_var_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "consa"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CONSA_", extra="ignore")

    var_dir: Path = Field(default_factory=_default_var_dir)
    """Where the embedded defaults live: the SQLite database, the broker file and artifacts."""
    database_url: str = ""
    """SQLAlchemy URL. Empty: sqlite file <var_dir>/consa.db."""
    broker_url: str = ""
    """Celery broker. Empty: kombu's SQLAlchemy transport on <var_dir>/broker.db (no Redis needed)."""
    queue: str = "gpu"
    """Celery queue the jobs go to; one worker process per GPU consumes it."""
    artifact_dir: Path | None = None
    """Where job artifacts are stored. Empty: <var_dir>/artifacts."""
    model_roots: Annotated[list[Path], NoDecode] = []
    """Directories a job's local model path must lie under (os.pathsep or comma separated)."""
    data_roots: Annotated[list[Path], NoDecode] = []
    """Directories a job's dataset path must lie under."""
    default_dataset: Path | None = None
    """Dataset used when a job names none (must lie under a data root too)."""
    allow_hub_models: bool = True
    """Accept hub model IDs (org/name); the worker needs network access or a warm hub cache."""
    visibility_timeout_s: int = 7 * 24 * 3600
    """Redis redelivers an unacknowledged task after this long; keep it above the longest job."""
    stale_after_s: int = 15 * 60
    """A running job with no heartbeat for this long is considered lost by a redelivered task."""
    max_page_size: int = 100
    idempotency_ttl_s: int = 24 * 3600
    """An Idempotency-Key is remembered this long (Stripe: 24 h); after that it may name a new request."""

    @field_validator("model_roots", "data_roots", mode="before")
    @classmethod
    def _split_paths(cls, value):
        # Accept a JSON list or a plain "a:b" / "a,b" string, like PATH.
        if isinstance(value, str):
            value = value.strip()
            if value.startswith("["):
                return json.loads(value)
            return [p for p in value.replace(",", os.pathsep).split(os.pathsep) if p]
        return value

    @model_validator(mode="after")
    def _fill_defaults(self):
        self.database_url = self.database_url or f"sqlite:///{self.var_dir / 'consa.db'}"
        self.broker_url = self.broker_url or f"sqla+sqlite:///{self.var_dir / 'broker.db'}"
        self.artifact_dir = self.artifact_dir or self.var_dir / "artifacts"
        self.model_roots = [p.expanduser().resolve() for p in self.model_roots]
        self.data_roots = [p.expanduser().resolve() for p in self.data_roots]
        return self

    def ensure_dirs(self) -> None:
        self.var_dir.mkdir(parents=True, exist_ok=True)
        self.artifact_dir.mkdir(parents=True, exist_ok=True)


@lru_cache
def get_settings() -> Settings:
    return Settings()
