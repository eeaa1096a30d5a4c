"""A small client for the consa service's v1 HTTP API, on the standard library only.

consa/ must not depend on the service's packages, and a person driving a remote GPU server from a
laptop should not need FastAPI or httpx installed, so this uses urllib.

Requests that are safe to repeat (GET/HEAD/PUT/DELETE, and a POST carrying an Idempotency-Key) are
retried with exponential backoff on connection errors, 429 and 5xx (Retry-After is honoured), so a
reset or a server restart costs a few seconds instead of an hours-long `--wait`. Downloads resume
from their `.part` file with `Range` + `If-Range`.
"""

import hashlib
import http.client
import json
import os
import random
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

TERMINAL = ("succeeded", "failed", "cancelled")
IDEMPOTENT = ("GET", "HEAD", "PUT", "DELETE", "OPTIONS")
RETRY_STATUS = (429, 500, 502, 503, 504)
# What a dropped connection looks like from urllib: refused/reset sockets, a server that closed the
# connection before answering or in the middle of a body, timeouts.
TRANSIENT = (urllib.error.URLError, ConnectionError, http.client.HTTPException, TimeoutError, OSError)


class ApiError(Exception):
    """The server answered with an error (an RFC 9457 problem document when it could)."""

    def __init__(self, status: int, title: str, detail: str | None = None, code: str | None = None,
                 errors: list | None = None, retry_after: str | None = None):
        self.status, self.title, self.detail, self.code, self.errors = status, title, detail, code, errors
        self.retry_after = retry_after  # the Retry-After header of a 429/503, when sent
        super().__init__(f"{status} {title}" + (f": {detail}" if detail else ""))


class ConnectionFailed(Exception):
    """The server could not be reached at all (wrong URL, not running, network down)."""


class Client:
    def __init__(self, url: str | None = None, key: str | None = None, timeout: float = 30.0, *,
                 retries: int = 5, backoff_s: float = 0.5, max_backoff_s: float = 30.0):
        self.url = (url or os.environ.get("CONSA_URL") or "http://127.0.0.1:8000").rstrip("/")
        self.key = key or os.environ.get("CONSA_API_KEY")
        self.timeout = timeout
        self.retries, self.backoff_s, self.max_backoff_s = retries, backoff_s, max_backoff_s
        self.sleep = time.sleep  # tests replace it to skip the waits

    # -- plumbing ---------------------------------------------------------------------------
    def backoff(self, attempt: int, retry_after: str | None = None) -> float:
        """Seconds to wait before retry `attempt` (0-based): Retry-After when the server sent one,
        else exponential with full jitter, so many clients do not come back in step."""
        if retry_after and retry_after.strip().isdigit():
            return min(float(retry_after), self.max_backoff_s)
        return random.uniform(0, min(self.max_backoff_s, self.backoff_s * 2 ** attempt))

    def _retrying(self, method: str, headers: dict | None, attempt_fn, repeatable: bool | None = None):
        """Run attempt_fn(), retrying transient failures when the request is safe to repeat."""
        if repeatable is None:
            repeatable = method in IDEMPOTENT or bool((headers or {}).get("Idempotency-Key"))
        attempt = 0
        while True:
            try:
                return attempt_fn()
            except ApiError as e:
                if not repeatable or e.status not in RETRY_STATUS or attempt >= self.retries:
                    raise
                wait = self.backoff(attempt, e.retry_after)
            except ConnectionFailed:
                if not repeatable or attempt >= self.retries:
                    raise
                wait = self.backoff(attempt)
            self.sleep(wait)
            attempt += 1

    def _request(self, method: str, path: str, *, query: dict | None = None, body: dict | None = None,
                 headers: dict | None = None):
        """Send one request (no retry); return the open response (the caller reads or streams it)."""
        url = self.url + path
        if query:
            query = {k: v for k, v in query.items() if v is not None}
            if query:
                url += "?" + urllib.parse.urlencode(query)
        data = None
        all_headers = {"Accept": "application/json"} | (headers or {})
        if body is not None:
            data = json.dumps(body).encode()
            all_headers["Content-Type"] = "application/json"
        req = urllib.request.Request(url, data=data, method=method, headers=all_headers)
        if self.key:  # never carried along a redirect (a presigned download URL must not receive the key)
            req.add_unredirected_header("Authorization", f"Bearer {self.key}")
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            raise _api_error(e) from None
        except TRANSIENT as e:
            reason = getattr(e, "reason", None) or e or type(e).__name__
            raise ConnectionFailed(f"cannot reach {self.url}: {reason}") from None

    def _json(self, method: str, path: str, *, repeatable: bool | None = None, **kwargs) -> dict:
        def attempt():
            with self._request(method, path, **kwargs) as resp:
                try:
                    return json.load(resp)
                except TRANSIENT as e:  # the connection dropped mid-body
                    raise ConnectionFailed(f"connection to {self.url} lost while reading: {e}") from None

        return self._retrying(method, kwargs.get("headers"), attempt, repeatable)

    # -- jobs -------------------------------------------------------------------------------
    def submit(self, params: dict, idempotency_key: str | None = None) -> dict:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self._json("POST", "/v1/jobs", body=params, headers=headers)

    def estimate(self, params: dict) -> dict:
        """How long the job would take (nothing is queued): POST /v1/jobs/estimate."""
        return self._json("POST", "/v1/jobs/estimate", body=params, repeatable=True)

    def list_jobs(self, *, status: str | None = None, model: str | None = None, limit: int | None = None,
             after: str | None = None) -> dict:
        return self._json("GET", "/v1/jobs", query={"status": status, "model": model, "limit": limit, "after": after})

    def get(self, job_id: str) -> dict:
        return self._json("GET", f"/v1/jobs/{_segment(job_id)}")

    def cancel(self, job_id: str) -> dict:
        # Cancelling twice is cancelling once, so this POST may be repeated like an idempotent call.
        return self._json("POST", f"/v1/jobs/{_segment(job_id)}/cancel", repeatable=True)

    def delete(self, job_id: str) -> dict:
        return self._json("DELETE", f"/v1/jobs/{_segment(job_id)}")

    def events(self, job_id: str, *, after: int | None = None, limit: int | None = None) -> dict:
        return self._json("GET", f"/v1/jobs/{_segment(job_id)}/events", query={"after": after, "limit": limit})

    def iter_events(self, job_id: str, *, after: int | None = None, follow: bool = False, poll_s: float = 2.0):
        """Yield events oldest first; with follow, keep polling until the job has ended and all are read."""
        while True:
            page = self.events(job_id, after=after)
            for event in page["data"]:
                after = event["id"]
                yield event
            if page.get("has_more"):
                continue
            if not follow:
                return
            if self.get(job_id)["status"] in TERMINAL:
                # The final status event is written with the status: one more pass reads it, then stop.
                follow = False
                continue
            time.sleep(poll_s)

    def wait(self, job_id: str, *, poll_s: float = 2.0, on_update=None) -> dict:
        """Poll until the job ends; call on_update(job) after every poll. Returns the final job."""
        while True:
            job = self.get(job_id)
            if on_update:
                on_update(job)
            if job["status"] in TERMINAL:
                return job
            time.sleep(poll_s)

    # -- artifacts --------------------------------------------------------------------------
    def artifacts(self, job_id: str) -> list[dict]:
        return self._json("GET", f"/v1/jobs/{_segment(job_id)}/artifacts")["data"]

    def download(self, job_id: str, name: str, dest: str | Path, *, sha256: str | None = None,
                 size: int | None = None, on_chunk=None, progress: bool = False) -> Path:
        """Stream one artifact to `dest` (a file, or a directory to put `name` in); verify sha256 when given.

        Bytes go to `.<name>.<sha256 prefix>.part` beside `dest`, renamed once complete, so an interrupted download
        leaves no file that looks complete, and the next call (or the next retry after a dropped
        connection) asks only for the rest: `Range: bytes=<have>-`, with `If-Range: "<sha256>"` so a
        changed artifact is sent whole instead of spliced. `progress` draws a tqdm bar on stderr.
        """
        dest = Path(dest)
        if dest.is_dir():
            dest = dest / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        # The part file is named after the version it holds, so a part of an older version of the
        # artifact is never continued with the new one's bytes (If-Range guards the server side).
        part = dest.with_name(f".{dest.name}.{sha256[:16]}.part" if sha256 else f".{dest.name}.part")
        for stale in dest.parent.glob(f".{dest.name}.*part"):
            if stale != part:
                stale.unlink()
        path = f"/v1/jobs/{_segment(job_id)}/artifacts/{_segment(name)}"
        bar = None
        if progress:
            import sys

            from tqdm import tqdm  # comes with transformers

            bar = tqdm(total=size, desc=name, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr)

        def attempt():
            have = part.stat().st_size if part.exists() else 0
            if size is not None and have > size:  # not a piece of this artifact
                part.unlink()
                have = 0
            if size is not None and have == size:
                return  # complete already (the previous attempt died after its last byte)
            headers = {"Accept": "*/*"}
            if have:
                headers["Range"] = f"bytes={have}-"
                if sha256:
                    headers["If-Range"] = f'"{sha256}"'
            try:
                resp = self._request("GET", path, headers=headers)
            except ApiError as e:
                if e.status == 416:  # our part is longer than the artifact: not the same file, start over
                    part.unlink(missing_ok=True)
                    raise ConnectionFailed(f"{part} did not match {name}; starting over") from None
                raise
            with resp, open(part, "ab" if resp.status == 206 else "wb") as out:
                if bar is not None:
                    bar.reset(total=size)
                    bar.update(have if resp.status == 206 else 0)
                try:
                    while chunk := resp.read(1 << 20):
                        out.write(chunk)
                        if bar is not None:
                            bar.update(len(chunk))
                        if on_chunk:
                            on_chunk(len(chunk))
                except TRANSIENT as e:
                    raise ConnectionFailed(f"download of {name} interrupted: {e}") from None
            if size is not None and part.stat().st_size < size:  # the server closed early without an error
                raise ConnectionFailed(f"download of {name} ended at {part.stat().st_size} of {size} bytes")

        try:
            self._retrying("GET", None, attempt)
        finally:
            if bar is not None:
                bar.close()
        if sha256:
            digest = hashlib.sha256()
            with open(part, "rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
            if digest.hexdigest() != sha256:
                part.unlink()
                raise ApiError(502, "Bad Gateway", f"{name}: downloaded bytes have sha256 {digest.hexdigest()}, "
                                                   f"the server listed {sha256}", code="checksum_mismatch")
        os.replace(part, dest)
        return dest

    # -- health -----------------------------------------------------------------------------
    def health(self) -> dict:
        return self._json("GET", "/healthz")


def _segment(value: str) -> str:
    # Quote everything, "/" included: a job id or artifact name is one path segment, never a route.
    return urllib.parse.quote(value, safe="")


def _api_error(e: urllib.error.HTTPError) -> ApiError:
    """Turn an HTTP error into ApiError, reading the problem+json body when there is one."""
    try:
        raw = e.read()
    except TRANSIENT:
        raw = b""
    retry_after = e.headers.get("Retry-After") if e.headers else None
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        text = raw.decode(errors="replace").strip()[:500] or None
        return ApiError(e.code, e.reason or "error", text, retry_after=retry_after)
    return ApiError(body.get("status", e.code), body.get("title") or e.reason or "error",
                    body.get("detail"), body.get("code"), body.get("errors"), retry_after=retry_after)
