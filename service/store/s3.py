"""The S3 back end: a job's files are objects `<prefix><job id>/<name>` in one bucket of any S3-compatible
store (AWS S3, MinIO, Ceph RGW, OpenStack Swift's s3api, GCS's XML API), through boto3.

- put: a file up to one part (CONSA_S3_PART_SIZE_MB, 16 MiB) is one PutObject; a larger one a multipart
  upload: each part is read once, in order, and fed to the sha256, then sent (with a Content-MD5 the
  server checks) by one of CONSA_S3_UPLOAD_CONCURRENCY (4) threads while the next is read: the file is
  never read twice, and at most concurrency + 1 parts are in memory.
  PutObject and CompleteMultipartUpload are atomic (a reader sees no object or the whole one); a failed
  upload is aborted, and one whose worker died is aborted by the reconciler's sweep.
- read: GetObject with a Range, streamed in chunks.
- the search state: written by the search to the worker's local CONSA_ARTIFACT_DIR, then put as the
  object `<job id>/.search_state.safetensors`; a later attempt on any host gets it back from there.
- credentials: boto3's standard chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE and
  ~/.aws/config, an instance or pod role); no CONSA_ setting holds a secret.
"""

import base64
import datetime as dt
import errno
import hashlib
import logging
import math
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from service import artifacts
from service.settings import Settings
from service.store import ArtifactStore, StoredObject, StoreError

log = logging.getLogger("consa.store")
MiB = 1 << 20
MAX_PARTS = 10_000  # S3's limit on the parts of one upload
MIN_PART = 5 * MiB  # S3's smallest part (but the last)
_MISSING = {"NoSuchKey", "404", "NotFound", "NoSuchUpload"}


def _md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()


def _code(e: Exception) -> str:
    return e.response.get("Error", {}).get("Code", "") if isinstance(e, ClientError) else ""


def _error(e: Exception, what: str) -> StoreError:
    """A store failure as an OSError whose message names the cause, never the endpoint or the key."""
    if isinstance(e, ClientError):
        code = _code(e) or "error"
        return StoreError(errno.ENOENT if code in _MISSING else errno.EIO,
                          f"the object store refused to {what} ({code})")
    return StoreError(errno.EIO, f"the object store could not be reached to {what} ({type(e).__name__})")


def client_config(settings: Settings, *, addressing_style: str) -> Config:
    return Config(signature_version="s3v4", s3={"addressing_style": addressing_style},
                  retries={"mode": "standard", "max_attempts": 5}, connect_timeout=10, read_timeout=120,
                  # Only the checksums the API requires: third-party servers refuse the newer default
                  # (CRC32 trailers in aws-chunked bodies); each part carries a Content-MD5 instead.
                  request_checksum_calculation="when_required", response_checksum_validation="when_required")


class S3Store(ArtifactStore):
    kind = "s3"

    def __init__(self, client, bucket: str, *, prefix: str = "", local_dir: Path, part_size: int = 16 * MiB,
                 concurrency: int = 4, presign_client=None):
        if not bucket:
            raise ValueError("CONSA_ARTIFACT_STORE=s3 needs CONSA_S3_BUCKET")
        self.client, self.bucket, self.prefix = client, bucket, prefix
        self.presign_client = presign_client or client
        self.local_dir = Path(local_dir)  # the worker's scratch: its copy of the search state
        self.part_size = max(MIN_PART, part_size)
        self.concurrency = max(1, concurrency)  # parts uploading at once: memory ~ (concurrency + 1) x part size

    @classmethod
    def from_settings(cls, settings: Settings) -> "S3Store":
        style = settings.s3_addressing_style or ("path" if settings.s3_endpoint_url else "auto")
        session = boto3.session.Session()
        make = lambda endpoint: session.client(
            "s3", endpoint_url=endpoint or None, region_name=settings.s3_region or None,
            config=client_config(settings, addressing_style=style))
        client = make(settings.s3_endpoint_url)
        presign = make(settings.s3_public_endpoint_url) if settings.s3_public_endpoint_url else client
        return cls(client, settings.s3_bucket, prefix=settings.s3_prefix, local_dir=settings.artifact_dir,
                   part_size=settings.s3_part_size_mb * MiB, concurrency=settings.s3_upload_concurrency,
                   presign_client=presign)

    def key(self, job_id: str, name: str = "") -> str:
        return f"{self.prefix}{job_id}/{name}"

    def _check(self, name: str) -> None:
        if name != artifacts.SEARCH_STATE and not artifacts.valid_name(name):
            raise ValueError(f"invalid artifact name {name!r}")

    # -- writing -------------------------------------------------------------------------------
    def part_size_for(self, size: int) -> int:
        """The configured part size, or larger (whole MiB) when the file would need more than 10,000 parts."""
        return max(self.part_size, math.ceil(size / MAX_PARTS / MiB) * MiB)

    def put(self, job_id: str, name: str, src: Path) -> tuple[int, str]:
        self._check(name)
        return self._upload(self.key(job_id, name), Path(src))

    def _upload(self, key: str, src: Path) -> tuple[int, str]:
        part_size = self.part_size_for(os.path.getsize(src))
        digest = hashlib.sha256()
        with open(src, "rb") as f:
            data = f.read(part_size)
            digest.update(data)
            if len(data) < part_size:  # the whole file: one atomic PutObject
                try:
                    self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentMD5=_md5_b64(data))
                except (ClientError, BotoCoreError) as e:
                    raise _error(e, "store a file") from None
                return len(data), digest.hexdigest()
            try:
                upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"]
            except (ClientError, BotoCoreError) as e:
                raise _error(e, "start an upload") from None
            try:
                etags: dict[int, str] = {}
                size, number, pending = 0, 0, set()
                with ThreadPoolExecutor(self.concurrency, thread_name_prefix="s3-part") as pool:
                    while data:
                        size += len(data)
                        number += 1
                        while len(pending) >= self.concurrency:  # at most `concurrency` parts in flight
                            done, pending = wait(pending, return_when=FIRST_COMPLETED)
                            for future in done:
                                future.result()  # an upload's error stops the reading here
                        pending.add(pool.submit(self._part, key, upload_id, number, data, etags))
                        data = None  # the thread holds the part; the next is read (and hashed, in order) now
                        data = f.read(part_size)
                        digest.update(data)
                    for future in pending:
                        future.result()
                self.client.complete_multipart_upload(
                    Bucket=self.bucket, Key=key, UploadId=upload_id,
                    MultipartUpload={"Parts": [{"ETag": etags[n], "PartNumber": n} for n in sorted(etags)]})
            except BaseException as e:
                try:
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
                except Exception:  # the reconciler's sweep aborts it later
                    log.warning("could not abort the upload of %s", key)
                if isinstance(e, (ClientError, BotoCoreError)):
                    raise _error(e, "store a file") from None
                raise
        return size, digest.hexdigest()

    def _part(self, key: str, upload_id: str, number: int, data: bytes, etags: dict[int, str]) -> None:
        etags[number] = self.client.upload_part(Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number,
                                                Body=data, ContentMD5=_md5_b64(data))["ETag"]

    def probe(self, job_id: str) -> None:
        key = self.key(job_id, ".probe")
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=b"\0" * 4096)
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except (ClientError, BotoCoreError) as e:
            raise _error(e, "take a write") from None

    def check(self) -> None:
        # A listing of the prefix, not HeadBucket: a policy that limits ListBucket to the prefix allows it.
        try:
            self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)
        except (ClientError, BotoCoreError) as e:
            raise _error(e, "list the bucket") from None

    # -- reading -------------------------------------------------------------------------------
    def stat(self, job_id: str, name: str) -> StoredObject | None:
        self._check(name)
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self.key(job_id, name))
        except ClientError as e:
            if _code(e) in _MISSING:
                return None
            raise _error(e, "describe a file") from None
        except BotoCoreError as e:
            raise _error(e, "describe a file") from None
        return StoredObject(name, head["ContentLength"], head.get("LastModified"))

    def read(self, job_id: str, name: str, start: int = 0, end: int | None = None,
             chunk_size: int = 1 << 20) -> Iterator[bytes]:
        self._check(name)
        extra = {} if start == 0 and end is None else {"Range": f"bytes={start}-{'' if end is None else end}"}
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self.key(job_id, name), **extra)["Body"]
        except (ClientError, BotoCoreError) as e:
            raise _error(e, "read a file") from None
        try:
            yield from body.iter_chunks(chunk_size)
        except BotoCoreError as e:
            raise _error(e, "read a file") from None
        finally:
            body.close()

    def _paged(self, operation: str, field: str, prefix: str, what: str) -> Iterator[dict]:
        """Every entry of a paginated listing under `prefix`."""
        try:
            for page in self.client.get_paginator(operation).paginate(Bucket=self.bucket, Prefix=prefix):
                yield from page.get(field, [])
        except (ClientError, BotoCoreError) as e:
            raise _error(e, what) from None

    def _objects(self, prefix: str) -> Iterator[dict]:
        return self._paged("list_objects_v2", "Contents", prefix, "list files")

    def files(self, job_id: str) -> list[StoredObject]:
        base = self.key(job_id)
        return [StoredObject(o["Key"][len(base):], o["Size"], o.get("LastModified")) for o in self._objects(base)]

    def job_ids(self) -> Iterator[tuple[str, dt.datetime | None]]:
        newest: dict[str, dt.datetime | None] = {}
        for o in self._objects(self.prefix):
            job_id, sep, _ = o["Key"][len(self.prefix):].partition("/")
            if sep and job_id:
                seen, modified = newest.get(job_id), o.get("LastModified")
                newest[job_id] = modified if seen is None or (modified and modified > seen) else seen
        yield from newest.items()

    # -- deleting ------------------------------------------------------------------------------
    def delete_job(self, job_id: str, keep_search_state: bool = False) -> None:
        keep = self.key(job_id, artifacts.SEARCH_STATE) if keep_search_state else None
        # One DeleteObject per file (a job has about ten): DeleteObjects needs a Content-MD5 that some
        # servers insist on and newer botocore no longer sends.
        try:
            for o in list(self._objects(self.key(job_id))):
                if o["Key"] != keep:
                    self.client.delete_object(Bucket=self.bucket, Key=o["Key"])
            for upload in self._uploads(self.key(job_id)):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        except (ClientError, BotoCoreError) as e:
            raise _error(e, "delete files") from None
        local = artifacts.job_dir(self.local_dir, job_id)  # this process's copy of the search state
        if keep_search_state:
            for path in local.glob("*") if local.is_dir() else ():
                if path.name != artifacts.SEARCH_STATE:
                    path.unlink(missing_ok=True)
        else:
            shutil.rmtree(local, ignore_errors=True)

    def _uploads(self, prefix: str) -> Iterator[dict]:
        return self._paged("list_multipart_uploads", "Uploads", prefix, "list uploads")

    def abort_stale_uploads(self, older_than_s: float) -> list[str]:
        before = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=older_than_s)
        aborted = []
        for upload in list(self._uploads(self.prefix)):
            initiated = upload.get("Initiated")
            if initiated is not None and initiated.tzinfo is None:
                initiated = initiated.replace(tzinfo=dt.timezone.utc)
            if initiated is None or initiated < before:
                try:
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"],
                                                       UploadId=upload["UploadId"])
                except ClientError as e:
                    if _code(e) not in _MISSING:
                        raise _error(e, "abort an upload") from None
                aborted.append(upload["Key"])
        return aborted

    # -- the search state ----------------------------------------------------------------------
    def state_file(self, job_id: str) -> Path:
        return artifacts.search_state_path(self.local_dir, job_id)

    def push_state(self, job_id: str, path: Path) -> None:
        self._upload(self.key(job_id, artifacts.SEARCH_STATE), Path(path))

    def pull_state(self, job_id: str, path: Path) -> bool:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".download")
        try:
            with open(tmp, "wb") as out:
                out.writelines(self.read(job_id, artifacts.SEARCH_STATE))
        except StoreError as e:
            tmp.unlink(missing_ok=True)
            if e.errno == errno.ENOENT:
                path.unlink(missing_ok=True)  # the store is the truth: a local leftover is no resume point
                return False
            raise
        os.replace(tmp, path)
        return True

    def delete_state(self, job_id: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key(job_id, artifacts.SEARCH_STATE))
        except (ClientError, BotoCoreError) as e:
            raise _error(e, "delete a file") from None
        local = self.state_file(job_id)
        local.unlink(missing_ok=True)
        try:
            local.parent.rmdir()  # this process's folder of the job, when nothing else is in it
        except OSError:
            pass

    # -- downloads -----------------------------------------------------------------------------
    def presigned_url(self, job_id: str, name: str, *, content_type: str, ttl_s: int) -> str | None:
        self._check(name)
        return self.presign_client.generate_presigned_url(
            "get_object", ExpiresIn=ttl_s,
            Params={"Bucket": self.bucket, "Key": self.key(job_id, name), "ResponseContentType": content_type,
                    "ResponseContentDisposition": f'attachment; filename="{name}"'})
