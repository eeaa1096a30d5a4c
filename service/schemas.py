"""Request and response bodies of the v1 API (in the style of OpenAI's fine-tuning jobs API)."""

import datetime as dt
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_serializer

from service import models

Status = Literal["queued", "running", "cancel_requested", "succeeded", "failed", "cancelled"]
assert set(Status.__args__) == set(models.STATUSES)


class JobCreate(BaseModel):
    """What to search for. Everything but `model` and `sparsity` has a default."""

    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not a silent default

    model: str = Field(min_length=1, max_length=1000,
                       description="A hub model ID (org/name) or an absolute path under one of the server's model roots.")
    revision: str | None = Field(None, max_length=200, description="Hub revision (branch, tag or commit).")
    sparsity: float = Field(ge=0.0, le=1.0, description="Share of attention units that become sliding-window.")
    granularity: Literal["layer", "kv_head"] = Field("kv_head", description="Switch whole layers or single KV heads.")
    window: int = Field(256, gt=0, le=1 << 20, description="Sliding-window length in tokens.")
    sink_tokens: int = Field(0, ge=0, le=1 << 16, description="Leading tokens every SWA unit still attends to.")
    dataset: str | None = Field(None, max_length=4000,
                                description="Absolute path of a text file, directory or .jsonl under one of the "
                                            "server's data roots. Default: the server's default dataset.")
    retrieval_ratio: float | None = Field(None, ge=0.0, le=1.0,
                                          description="Share of training sequences replaced by synthetic multi-key "
                                                      "retrieval documents built over the dataset. Default: 0.25 when "
                                                      "seq_len >= max(4 x window, 512), else 0.")
    steps: int = Field(200, ge=1, le=1_000_000)
    seq_len: int = Field(1024, ge=8, le=1 << 20, description="Training sequence length in tokens.")
    batch_size: int = Field(1, ge=1, le=4096)
    lr: float = Field(0.1, gt=0.0, le=100.0, description="Learning rate of the gates.")
    objective: Literal["lm", "distill"] = Field("lm", description="Next-token loss, or distillation to the full model.")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    evaluate: bool = Field(False, description="Evaluate the allocation against baselines after the search.")
    metadata: dict[str, str] = Field(default_factory=dict, max_length=16,
                                     description="Up to 16 string pairs, returned with the job.")


class Progress(BaseModel):
    step: int
    total_steps: int
    loss: float | None = None
    sparsity: float | None = Field(None, description="Expected sparsity of the gates at this step.")
    target: float | None = Field(None, description="Sparsity target at this step (it ramps up to the requested one).")
    lambda1: float | None = None
    lambda2: float | None = None
    elapsed_s: float | None = None


class JobError(BaseModel):
    code: str
    message: str
    type: Literal["user", "system"] = Field(description="`user`: fix the request and resubmit. `system`: a server fault.")


class _Timestamps(BaseModel):
    @field_serializer("*", when_used="json", check_fields=False)
    def _utc(self, value):
        # SQLite hands datetimes back without a zone; every timestamp we store is UTC.
        if isinstance(value, dt.datetime) and value.tzinfo is None:
            return value.replace(tzinfo=dt.timezone.utc)
        return value


class Job(_Timestamps):
    object: Literal["allocation.job"] = "allocation.job"
    id: str
    status: Status
    model: str
    config: dict = Field(description="The validated request (all defaults filled in), without metadata.")
    metadata: dict[str, str]
    progress: Progress | None
    error: JobError | None
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None

    @classmethod
    def of(cls, row: models.Job) -> "Job":
        error = JobError(code=row.error_code, message=row.error_message or "", type=row.error_type or "system") \
            if row.error_code else None
        return cls(id=row.id, status=row.status, model=row.model, config=row.params, metadata=row.meta or {},
                   progress=row.progress, error=error, created_at=row.created_at, started_at=row.started_at,
                   finished_at=row.finished_at)


class JobDeleted(BaseModel):
    object: Literal["allocation.job"] = "allocation.job"
    id: str
    deleted: bool = True


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Job]
    has_more: bool
    first_id: str | None
    last_id: str | None


class Event(_Timestamps):
    object: Literal["allocation.job.event"] = "allocation.job.event"
    id: int
    created_at: dt.datetime
    type: Literal["status", "progress", "info", "warning", "error"]
    message: str
    data: dict | None

    @classmethod
    def of(cls, row: models.JobEvent) -> "Event":
        return cls(id=row.id, created_at=row.created_at, type=row.type, message=row.message, data=row.data)


class EventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Event]
    has_more: bool


class ArtifactInfo(BaseModel):
    object: Literal["allocation.job.artifact"] = "allocation.job.artifact"
    name: str
    size: int = Field(description="Bytes.")
    sha256: str = Field(description="Hex digest of the bytes; also the download's ETag.")
    content_type: str
    url: str


class ArtifactList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ArtifactInfo]


class Problem(BaseModel):
    """An RFC 9457 problem detail, served as application/problem+json."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
    code: str | None = Field(None, description="A stable machine-readable reason, e.g. `validation_error`.")
    errors: list[dict] | None = Field(None, description="Per-field problems of a request that failed validation.")


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = {}
