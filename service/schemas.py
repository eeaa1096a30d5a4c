"""Request and response bodies of the v1 API (in the style of OpenAI's fine-tuning jobs API)."""

import datetime as dt
from typing import Literal

from dataclasses import MISSING

from pydantic import BaseModel, ConfigDict, Field, create_model, field_serializer

from consa.core.config import RunOptions, SearchConfig, setting_fields
from service import models

Status = Literal["queued", "running", "cancel_requested", "succeeded", "failed", "cancelled"]
assert set(Status.__args__) == set(models.STATUSES)


# The API's wording for fields whose meaning on a server differs from the library's (paths live under roots).
_API_HELP = {
    "model": "A hub model ID (org/name) or an absolute path under one of the server's model roots.",
    "dataset": "Absolute path of a text file, directory or .jsonl under one of the server's data roots. "
               "Default: the server's default dataset.",
}


def _fields(settings) -> dict:
    """One request field per setting of a settings dataclass (consa.core.config: SearchConfig,
    RunOptions), with its default, bounds, choices and help."""
    out = {}
    for name, kind, default, meta, optional in setting_fields(settings):
        annotation = Literal[meta["choices"]] if "choices" in meta else kind
        bounds = {k: meta[k] for k in ("ge", "gt", "le", "max_length") if k in meta}
        if kind is str and default is MISSING:
            bounds["min_length"] = 1
        out[name] = (annotation | None if optional else annotation,
                     Field(... if default is MISSING else default, description=_API_HELP.get(name, meta["help"]),
                           **bounds))
    return out


# What only a job has: the caller's labels, returned with it and never passed to the library.
_METADATA = {"metadata": (dict[str, str], Field(default_factory=dict, max_length=16,
                                                description="Up to 16 string pairs, returned with the job."))}

# The search settings come from consa.core.config.SearchConfig and the run's options (evaluate, ...)
# from consa.core.config.RunOptions, their one source each; the worker maps a job's config back by the
# same names (worker/runner.py: search_config_of, RunOptions.from_dict). extra="forbid": a misspelt
# field is an error, not a silent default.
JobCreate = create_model("JobCreate", __config__=ConfigDict(extra="forbid"), __module__=__name__,
                         __doc__="What to search for. Everything but `model` and `sparsity` has a default.",
                         **_fields(SearchConfig), **_fields(RunOptions), **_METADATA)


class Progress(BaseModel):
    step: int
    total_steps: int
    loss: float | None = None
    sparsity: float | None = Field(None, description="Expected sparsity of the gates at this step.")
    target: float | None = Field(None, description="Sparsity target at this step (it ramps up to the requested one).")
    lambda1: float | None = None
    lambda2: float | None = None
    elapsed_s: float | None = Field(None, description="Seconds since this attempt's search started.")
    start_step: int | None = Field(None, description="The step this attempt's search started from: 0, or the "
                                                     "step a resumed search continued from (its pace is "
                                                     "elapsed_s over step - start_step).")
    phase: Literal["search", "evaluation", "export"] | None = Field(
        None, description="What the job is doing now; after the search the search's last numbers stay.")
    phase_done: int | None = Field(None, description="Steps of the current phase done (search steps, "
                                                     "allocations evaluated, export stages).")
    phase_total: int | None = Field(None, description="Steps of the current phase in all.")


class JobEstimate(BaseModel):
    """How long a job would take before it starts: rough (service/estimate.py says how it is made)."""

    object: Literal["allocation.job.estimate"] = "allocation.job.estimate"
    device: str = Field(description="The device kind the estimate is for: a live worker's (`cpu`, `cuda:<GPU name>`), "
                                    "else `cpu`.")
    model_params: int | None = None
    size_class: str | None = None
    search_steps: int | None = None
    step_s: float | None = Field(None, description="Seconds per search step.")
    search_s: float | None = None
    evaluation_units: int | None = Field(None, description="Baselines built + parts scored (0 without evaluate).")
    evaluation_s: float | None = None
    total_s: float | None = Field(None, description="search_s + evaluation_s; null when the model's shape is unknown.")
    basis: str = Field(description="How the number was made and how far to trust it.")


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
    shown_as: str | None = Field(None, description="How the dashboard shows it: `image` (the allocation's "
                                                   "heatmap), `table` (the evaluation); null: download only.")


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
