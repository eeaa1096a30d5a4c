"""/v1/jobs/{id}/artifacts: list a job's files and download them (Range + ETag), from the artifact store
(service/store/): a local file is served as one; an object of the s3 store is streamed from the bucket,
or, with CONSA_S3_PRESIGNED_DOWNLOADS, the client is sent to a short-lived presigned URL of it."""

import errno
import itertools
from typing import Annotated

from fastapi import APIRouter, Header, Path, Request, Response
from fastapi.responses import FileResponse, StreamingResponse

from service import artifacts, schemas
from service.crud import artifact_records
from service.deps import JobDep, SessionDep, SettingsDep
from service.problems import PROBLEM_RESPONSES, ProblemError, responses
from service.store import StoreError, get_store

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
            responses=PROBLEM_RESPONSES | responses(410, 416, 503) | {
                200: {"description": "The artifact's bytes, under its own media type (`content_type` in the list).",
                      "content": {t: {"schema": _BYTES if t != "application/json" else {"description": "any JSON"}}
                                  for t in artifacts.MEDIA_TYPES}},
                206: {"description": "Partial content (Range)."},
                302: {"description": "With CONSA_S3_PRESIGNED_DOWNLOADS: `Location` is a short-lived presigned URL "
                                     "of the object store that serves the bytes (Range works there too)."},
                304: {"description": "Not modified (If-None-Match)."}})
def download_artifact(job: JobDep, name: ArtifactName, session: SessionDep, settings: SettingsDep, request: Request,
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
    store = get_store(settings)
    path = store.local_path(job.id, name)
    if path is None:
        return _from_store(store, job.id, artifact, etag, settings, request, range)
    if not path.is_file():  # listed, but its file is gone (lost volume, manual cleanup)
        raise _gone(name)
    return FileResponse(path, media_type=artifact.content_type, filename=name,
                        headers={"ETag": etag, "Cache-Control": "private, max-age=31536000, immutable"})


def _gone(name: str) -> ProblemError:
    return ProblemError(410, f"the file of artifact {name!r} is no longer stored; run the job again",
                        code="artifact_gone")


def _unavailable(e: StoreError) -> ProblemError:
    return ProblemError(503, f"the artifact store is unavailable: {e.strerror}", code="artifact_store_unavailable",
                        headers={"Retry-After": "5"})


def _from_store(store, job_id: str, artifact, etag: str, settings, request: Request, range_header: str | None):
    """An object of the s3 store: HEAD from the database's record, GET streamed (or redirected)."""
    name, size = artifact.name, artifact.size
    headers = {"ETag": etag, "Accept-Ranges": "bytes", "Content-Disposition": f'attachment; filename="{name}"',
               "Cache-Control": "private, max-age=31536000, immutable"}
    head = request.method == "HEAD"
    if head or settings.s3_presigned_downloads:
        try:
            if store.stat(job_id, name) is None:
                raise _gone(name)
        except StoreError as e:
            raise _unavailable(e) from None
    if head:
        return Response(status_code=200, media_type=artifact.content_type,
                        headers=headers | {"Content-Length": str(size)})
    if settings.s3_presigned_downloads:
        url = store.presigned_url(job_id, name, content_type=artifact.content_type, ttl_s=settings.s3_presign_ttl_s)
        return Response(status_code=302, headers={"Location": url, "ETag": etag, "Cache-Control": "no-store"})
    span = _one_range(range_header, request.headers.get("if-range"), etag, size)
    start, end = span if span else (0, size - 1)
    try:
        chunks = store.read(job_id, name, start, end if span else None)
        first = next(chunks, b"")  # the store's errors (gone, unreachable) become answers, not a broken stream
    except StoreError as e:
        if e.errno == errno.ENOENT:
            raise _gone(name) from None
        raise _unavailable(e) from None
    headers["Content-Length"] = str(end - start + 1 if size else 0)
    if span:
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    return StreamingResponse(itertools.chain([first], chunks), status_code=206 if span else 200,
                             media_type=artifact.content_type, headers=headers)


def _one_range(header: str | None, if_range: str | None, etag: str, size: int) -> tuple[int, int] | None:
    """(start, end) of a single satisfiable byte range to serve as 206; None: the whole file (no Range, an
    If-Range naming another version, or several ranges, which a server may answer with the whole file)."""
    if header is None or (if_range is not None and if_range.strip() != etag) or "," in header:
        return None
    start, _, end = header.partition("=")[2].strip().partition("-")
    if start == "":  # the last N bytes
        return max(0, size - int(end)), size - 1
    return int(start), min(int(end), size - 1) if end else size - 1


@router.head("/{job_id}/artifacts/{name:path}", summary="An artifact's headers (size, ETag) without its bytes",
             response_class=Response, responses=PROBLEM_RESPONSES | responses(410, 503) | {
                 200: {"description": "Content-Length, Content-Type and ETag of the artifact."},
                 304: {"description": "Not modified (If-None-Match)."}})
def head_artifact(job: JobDep, name: ArtifactName, session: SessionDep, settings: SettingsDep, request: Request,
                  if_none_match: Annotated[str | None, Header(include_in_schema=False)] = None):
    return download_artifact(job, name, session, settings, request, if_none_match=if_none_match)


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
