"""All service settings in one place, read from CONSA_* environment variables."""

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

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
    """Where job artifacts are stored (the local store), or a worker's local scratch space (the s3 store: files
    are staged here, then uploaded). Empty: <var_dir>/artifacts."""

    # -- the artifact store (service/store/) --
    artifact_store: Literal["local", "s3"] = "local"
    """`local`: files under artifact_dir, shared by the API and the workers (one host, or a shared volume).
    `s3`: objects in an S3-compatible bucket, so a worker shares no filesystem with the API. Credentials come
    from boto3's standard chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, an instance role)."""
    s3_bucket: str = ""
    """The bucket (s3 store); it must exist."""
    s3_prefix: str = ""
    """Prepended to every key: objects are `<prefix><job id>/<name>` (e.g. `consa/`)."""
    s3_endpoint_url: str = ""
    """The S3 API's URL for a store that is not AWS (MinIO, Ceph RGW, Swift s3api: http://minio:9000). Empty: AWS."""
    s3_public_endpoint_url: str = ""
    """The URL clients reach the store at, for presigned downloads, when it differs from s3_endpoint_url."""
    s3_region: str = ""
    """The bucket's region. Empty: AWS_REGION / AWS_DEFAULT_REGION / the AWS config file."""
    s3_addressing_style: Literal["", "auto", "path", "virtual"] = ""
    """Bucket in the path or in the host name. Empty: `path` with s3_endpoint_url (MinIO, Swift), else boto3's auto."""
    s3_part_size_mb: int = Field(16, ge=5, le=5120)
    """Multipart upload part size (MiB; larger when a file would need more than 10,000 parts)."""
    s3_upload_concurrency: int = Field(4, ge=1, le=64)
    """Parts of one upload sent at once; an upload holds about (this + 1) x the part size in memory."""
    s3_presigned_downloads: bool = False
    """Downloads answer 302 with a presigned URL of the object (the client fetches the bytes from the store,
    not through the API). Off: the API streams them from the store."""
    s3_presign_ttl_s: int = Field(300, ge=1, le=7 * 24 * 3600)
    """How long a presigned download URL is valid."""
    s3_stale_upload_s: int = 24 * 3600
    """The reconciler aborts multipart uploads begun longer ago than this (their worker died mid-upload)."""
    orphan_sweep_interval_s: float = 3600.0
    """How often the reconciler removes stored files of jobs that no longer exist and stale uploads. 0: never."""
    model_roots: Annotated[list[Path], NoDecode] = []
    """Directories a job's local model path must lie under (os.pathsep or comma separated)."""
    data_roots: Annotated[list[Path], NoDecode] = []
    """Directories a job's dataset path must lie under."""
    default_dataset: Path | None = None
    """Dataset used when a job names none (must lie under a data root too)."""
    allow_hub_models: bool = False
    """Accept hub model IDs (org/name): any key could then make a worker download any hub repository.
    Off by default; the worker needs network access or a warm hub cache."""
    visibility_timeout_s: int = 7 * 24 * 3600
    """Redis redelivers an unacknowledged task after this long; keep it above the longest job."""
    task_time_limit_s: int = 24 * 3600
    """A job attempt still running after this long fails (`time_limit_exceeded`): the runner checks it at every
    step and every unit of the evaluation and export, whatever the pool (Celery's own limit, a backstop 10 min
    later, works only with the prefork pool)."""

    # -- liveness and the reconciler (service/reconciler.py) --
    worker_heartbeat_s: float = 10.0
    """How often a worker records that it is alive (and beats the heartbeat of the job it runs)."""
    stale_after_s: int = 60
    """A running job, or a worker, with no heartbeat for this long is lost: its worker died."""
    reconcile_interval_s: float = 10.0
    """How often the API's reconciler compares the jobs table with the workers' heartbeats. 0: never."""
    requeue_after_s: int = 60
    """A queued job is published again when it has waited this long while a worker sat idle (its
    message was lost, e.g. with a Redis that had no AOF). Duplicates are harmless: one claim wins."""
    max_attempts: int = 2
    """A job whose worker died is queued again until it has been started this many times, then failed."""
    checkpoint_every_s: float = 60.0
    """The worker saves the search's state (its resume point) at least this often; 0: by steps only.
    A job whose worker died resumes from it, so a 6-hour search killed at hour 5 loses about a minute."""
    checkpoint_every_steps: int = 500
    """...and at least every this many steps (whichever comes first); 0: by time only. Both 0: never."""
    min_free_disk_mb: int = 1024
    """/readyz answers 503 (`checks.artifacts`) while the artifact store has less free space than this: every
    job would fail writing its checkpoint. 0: not checked."""
    gpus_per_job: int = 1
    """GPUs a worker runs each job's search over, data-parallel (consa.search.distributed): the worker must see
    this many (cuda:0..N-1, e.g. through its container's device reservation)."""

    # -- bounds on what one key may ask for --
    max_steps: int = 20_000
    """Largest `steps` of a job."""
    max_seq_len: int = 32_768
    """Largest `seq_len` of a job."""
    max_batch_size: int = 64
    """Largest `batch_size` of a job."""
    max_tokens_per_job: int = 2_000_000_000
    """Largest steps x seq_len x batch_size (training tokens) of one job: about a day of one GPU on a
    1B model. Refuses a job of weeks that each bound alone lets through."""
    max_metadata_bytes: int = 4096
    """Largest `metadata` of a job, as JSON bytes."""
    max_body_bytes: int = 64 * 1024
    """Largest request body (413 beyond)."""
    max_active_jobs_per_key: int = 20
    """Queued + running jobs one key may hold; a submit beyond gets 429 with Retry-After."""
    rate_limit_per_minute: int = 600
    """Requests per minute per key (token bucket, per API process); 0 turns it off. 429 beyond."""
    max_streams_per_key: int = 8
    """Open event streams per key (per API process); 429 beyond."""

    # -- database --
    db_pool_size: int = 10
    """Connections kept open per process."""
    db_max_overflow: int = 30
    """Extra connections under load. pool_size + overflow = 40 = the API's thread pool, so a request
    never waits on the pool longer than on a thread."""
    max_page_size: int = 100
    public_url: str = ""
    """The API's external base URL (https://consa.example.com), for absolute artifact URLs. Empty:
    artifact URLs are paths relative to the API (never taken from the request's Host header)."""
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
        if self.artifact_store == "s3" and not self.s3_bucket:
            raise ValueError("CONSA_ARTIFACT_STORE=s3 needs CONSA_S3_BUCKET")
        self.model_roots = [p.expanduser().resolve() for p in self.model_roots]
        self.data_roots = [p.expanduser().resolve() for p in self.data_roots]
        return self

    def ensure_dirs(self) -> None:
        self.var_dir.mkdir(parents=True, exist_ok=True)
        self.artifact_dir.mkdir(parents=True, exist_ok=True)


@lru_cache
def get_settings() -> Settings:
    return Settings()
