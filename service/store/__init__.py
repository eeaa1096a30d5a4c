"""The artifact store: where a job's files live, behind one small interface with two back ends.

- `local` (the default, `consa serve`): `<CONSA_ARTIFACT_DIR>/<job id>/<name>` on a filesystem the API and
  the workers share (service/artifacts.py: the layout, atomic copy + rename, sha256 while copying).
- `s3`: any S3-compatible object storage (AWS S3, MinIO, Ceph RGW, OpenStack Swift's s3api, GCS's XML
  API): objects `<CONSA_S3_PREFIX><job id>/<name>` in `CONSA_S3_BUCKET`, written by workers that share
  no filesystem with the API (service/store/s3.py).

What a job stores: its artifacts (names that `artifacts.valid_name` accepts: listed in the database,
served by the API) and the search state a requeued attempt resumes from (`artifacts.SEARCH_STATE`, a
hidden name: never listed or served). The database rows are the truth about what a job published;
the store holds the bytes. A worker writes the search state to a local file (`state_file`), then
`push_state` makes it durable in the store; the next attempt, on any host, `pull_state`s it back.
"""

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from service.settings import Settings


class StoreError(OSError):
    """The store refused or could not be reached. Its message names the cause, never a path, URL or key
    (a failed job shows it to the user: `storage_error`)."""


@dataclass(frozen=True)
class StoredObject:
    name: str  # the file's name in its job (an artifact's name, or artifacts.SEARCH_STATE)
    size: int
    modified: dt.datetime | None = None


class ArtifactStore:
    """One job's files: put (atomic, sha256 computed while the bytes stream), stat, read a byte range,
    list, delete. Every method takes the job id and a file name; names are checked by the caller
    (artifacts.valid_name) except the search state's."""

    kind = "base"

    def put(self, job_id: str, name: str, src: Path) -> tuple[int, str]:
        """Store the file `src` as `name`; return (size, sha256) of the bytes stored. A reader sees the
        old object or the whole new one, never a part."""
        raise NotImplementedError

    def stat(self, job_id: str, name: str) -> StoredObject | None:
        raise NotImplementedError

    def read(self, job_id: str, name: str, start: int = 0, end: int | None = None,
             chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """The bytes start..end (inclusive; None: to the end), in chunks of at most chunk_size."""
        raise NotImplementedError

    def files(self, job_id: str) -> list[StoredObject]:
        raise NotImplementedError

    def job_ids(self) -> Iterator[tuple[str, dt.datetime | None]]:
        """Every job that has files in the store, with the newest modification seen (for the orphan sweep)."""
        raise NotImplementedError

    def delete_job(self, job_id: str, keep_search_state: bool = False) -> None:
        """Remove a job's files; `keep_search_state` keeps what a requeued attempt resumes from."""
        raise NotImplementedError

    def probe(self, job_id: str) -> None:
        """Prove the store takes a write now (before hours of search); raise OSError if not."""
        raise NotImplementedError

    def check(self) -> None:
        """The store answers (the API's /readyz); raise OSError if not. Reads only."""

    # -- the search state (worker/runner.py) ---------------------------------------------------
    def state_file(self, job_id: str) -> Path:
        """The local file the worker's search writes its state to."""
        raise NotImplementedError

    def push_state(self, job_id: str, path: Path) -> None:
        """Make the state just written to `path` durable in the store (atomic: old or new)."""
        raise NotImplementedError

    def pull_state(self, job_id: str, path: Path) -> bool:
        """Bring the job's saved state to `path`; False when there is none."""
        raise NotImplementedError

    def delete_state(self, job_id: str) -> None:
        raise NotImplementedError

    # -- downloads (service/routers/artifacts.py) ------------------------------------------------
    def local_path(self, job_id: str, name: str) -> Path | None:
        """The file itself when the API can serve it from its own filesystem (local store), else None."""
        return None

    def presigned_url(self, job_id: str, name: str, *, content_type: str, ttl_s: int) -> str | None:
        """A short-lived URL that downloads the object without the API, where the back end has them."""
        return None

    def abort_stale_uploads(self, older_than_s: float) -> list[str]:
        """Abort multipart uploads begun more than older_than_s ago (a worker died mid-upload); their keys."""
        return []


_stores: dict[tuple, ArtifactStore] = {}


def get_store(settings: Settings) -> ArtifactStore:
    """The store the settings name (one per configuration and process: an S3 client is thread-safe
    and costly to build)."""
    if settings.artifact_store == "s3":
        key = ("s3", settings.s3_bucket, settings.s3_prefix, settings.s3_endpoint_url, settings.s3_region,
               settings.s3_addressing_style, settings.s3_part_size_mb, settings.s3_upload_concurrency,
               str(settings.artifact_dir))
        if key not in _stores:
            from service.store.s3 import S3Store

            _stores[key] = S3Store.from_settings(settings)
        return _stores[key]
    from service.store.local import LocalStore

    return LocalStore(settings.artifact_dir)
