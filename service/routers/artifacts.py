"""/v1/jobs/{id}/artifacts: list a job's files and download them (Range + ETag)."""

from typing import Annotated

from fastapi import APIRouter, Header, Path, Request, Response
from fastapi.responses import FileResponse

from service import artifacts, schemas
from service.crud import artifact_records
from service.deps import JobDep, SessionDep, SettingsDep
from service.problems import PROBLEM_RESPONSES, ProblemError, responses

router = APIRouter(prefix="/v1/jobs", tags=["artifacts"])
# A JSON artifact (the manifest, the evaluation's records) is a JSON document, so a client parses it as one.
_BYTES = {"type": "string", "format": "binary"}
# The spec states the name rule; the server checks it itself so a bad name gets 400 with the reason.
ArtifactName = Annotated[str, Path(description="The artifact's file name, as listed.", json_schema_extra={
    "pattern": f"^{artifacts.NAME_PATTERN}$", "maxLength": artifacts.NAME_MAX_LENGTH})]


@router.get("/{job_id}/artifacts", response_model=schemas.ArtifactList, responses=PROBLEM_RESPONSES,
            summary="List a job's artifacts")
def list_artifacts(job: JobDep, session: SessionDep, settings: SettingsDep, request: Request):
    """`url` is relative to the API (or absolute under CONSA_PUBLIC_URL): never built from the request's
    Host header, which a client or a proxy controls."""
    base = settings.public_url.rstrip("/")
    data = [schemas.ArtifactInfo(name=a.name, size=a.size, sha256=a.sha256, content_type=a.content_type,
                                 url=base + request.app.url_path_for("download_artifact", job_id=job.id, name=a.name),
                                 shown_as=artifacts.shown_as(a.name))
            for a in artifact_records.list_artifacts(session, job=job)]
    return schemas.ArtifactList(data=data)


@router.get("/{job_id}/artifacts/{name:path}", name="download_artifact", summary="Download an artifact",
            response_class=FileResponse,
            responses=PROBLEM_RESPONSES | responses(410, 416) | {
                200: {"description": "The artifact's bytes, under its own media type (`content_type` in the list).",
                      "content": {t: {"schema": _BYTES if t != "application/json" else {"description": "any JSON"}}
                                  for t in artifacts.MEDIA_TYPES}},
                206: {"description": "Partial content (Range)."},
                304: {"description": "Not modified (If-None-Match)."}})
def download_artifact(job: JobDep, name: ArtifactName, session: SessionDep, settings: SettingsDep,
                      if_none_match: Annotated[str | None, Header(include_in_schema=False)] = None,
                      range: Annotated[str | None, Header(include_in_schema=False)] = None):
    """The bytes of one artifact. `ETag` is the quoted sha256, so a client can check a download and
    resume it with `Range` + `If-Range`."""
    # `{name:path}` lets "a/../b" reach us instead of a bare router 404, so the answer can say why.
    if not artifacts.valid_name(name):
        raise ProblemError(400, f"invalid artifact name {name!r}: one file name, no '/' or '..'",
                           code="invalid_artifact_name")
    artifact = artifact_records.get_artifact(session, job=job, name=name)
    if artifact is None:
        raise ProblemError(404, f"job {job.id} has no artifact {name!r}", code="artifact_not_found")
    etag = f'"{artifact.sha256}"'
    tags = [t.strip() for t in (if_none_match or "").split(",")]
    if etag in tags or "*" in tags:
        return Response(status_code=304, headers={"ETag": etag})
    if range is not None:
        _check_range(range, artifact.size)
    path = artifacts.artifact_path(settings.artifact_dir, job.id, name)
    if not path.is_file():  # listed, but its file is gone (lost volume, manual cleanup)
        raise ProblemError(410, f"the file of artifact {name!r} is no longer stored; run the job again",
                           code="artifact_gone")
    return FileResponse(path, media_type=artifact.content_type, filename=name,
                        headers={"ETag": etag, "Cache-Control": "private, max-age=31536000, immutable"})


@router.head("/{job_id}/artifacts/{name:path}", summary="An artifact's headers (size, ETag) without its bytes",
             response_class=Response, responses=PROBLEM_RESPONSES | responses(410) | {
                 200: {"description": "Content-Length, Content-Type and ETag of the artifact."},
                 304: {"description": "Not modified (If-None-Match)."}})
def head_artifact(job: JobDep, name: ArtifactName, session: SessionDep, settings: SettingsDep,
                  if_none_match: Annotated[str | None, Header(include_in_schema=False)] = None):
    return download_artifact(job, name, session, settings, if_none_match=if_none_match)


def _check_range(header: str, size: int) -> None:
    """Refuse bad ranges here, as problem documents; FileResponse serves the good ones (206)."""
    unit, _, specs = header.partition("=")
    try:
        if unit.strip() != "bytes" or not specs.strip():
            raise ValueError
        satisfiable = False
        for spec in specs.split(","):
            start, dash, end = spec.strip().partition("-")
            if not dash or (start == "" and end == ""):
                raise ValueError
            if start == "":  # "-N": the last N bytes
                satisfiable |= int(end) > 0 and size > 0
            else:
                if end and int(end) < int(start):
                    raise ValueError
                satisfiable |= int(start) < size
    except ValueError:
        raise ProblemError(400, f"malformed Range header {header!r}", code="invalid_range") from None
    if not satisfiable:
        raise ProblemError(416, f"range {header!r} is outside the artifact's {size} bytes",
                           code="range_not_satisfiable", headers={"Content-Range": f"bytes */{size}"})
