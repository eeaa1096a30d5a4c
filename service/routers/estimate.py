"""POST /v1/jobs/estimate: how long a job would take, before it is submitted (service/estimate.py)."""

import datetime as dt
from collections import Counter

from fastapi import APIRouter

from service import estimate, schemas
from service.crud import heartbeats
from service.deps import ApiKeyDep, SessionDep, SettingsDep
from service.limits.job_size import check_limits
from service.limits.nul_bytes import reject_nul
from service.locations import resolve_dataset, resolve_model
from service.models import utcnow
from service.problems import PROBLEM_RESPONSES

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post("/estimate", response_model=schemas.JobEstimate, responses=PROBLEM_RESPONSES,
             summary="Estimate a job's time before submitting it")
def estimate_job(body: schemas.JobCreate, session: SessionDep, key: ApiKeyDep, settings: SettingsDep):
    """The body of a submit; nothing is queued. The time is search steps x a step time for the model's size
    on the device kind of the live workers (CPU or a GPU), plus the evaluation's units: rough, see `basis`."""
    reject_nul(body.model_dump(), ["body"])  # python mode: the JSON mode would mangle a lone surrogate in a key
    check_limits(settings, body)
    params = body.model_dump(exclude={"metadata"})
    params["model"] = resolve_model(settings, body.model)
    params["dataset"] = resolve_dataset(settings, body.dataset)
    stale_before = utcnow() - dt.timedelta(seconds=settings.stale_after_s)
    devices = Counter(w.device for w in heartbeats.live_workers(session, stale_before=stale_before) if w.device)
    device = devices.most_common(1)[0][0] if devices else "cpu"
    baselines = 9 if params.get("granularity") == "layer" else 10  # `even` needs units finer than layers
    return schemas.JobEstimate(**estimate.estimate(params, device, baselines=baselines))
