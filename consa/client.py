"""A small client for the consa service's v1 HTTP API, on the standard library only.

consa/ must not depend on the service's packages, and a person driving a remote GPU server from a
laptop should not need FastAPI or httpx installed, so this uses urllib.
"""

import hashlib
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

TERMINAL = ("succeeded", "failed", "cancelled")


class ApiError(Exception):
    """The server answered with an error (an RFC 9457 problem document when it could)."""

    def __init__(self, status: int, title: str, detail: str | None = None, code: str | None = None,
                 errors: list | None = None):
        self.status, self.title, self.detail, self.code, self.errors = status, title, detail, code, errors
        super().__init__(f"{status} {title}" + (f": {detail}" if detail else ""))


class ConnectionFailed(Exception):
    """The server could not be reached at all (wrong URL, not running, network down)."""


class Client:
    def __init__(self, url: str | None = None, key: str | None = None, timeout: float = 30.0):
        self.url = (url or os.environ.get("CONSA_URL") or "http://127.0.0.1:8000").rstrip("/")
        self.key = key or os.environ.get("CONSA_API_KEY")
        self.timeout = timeout

    # -- plumbing ---------------------------------------------------------------------------
    def _request(self, method: str, path: str, *, query: dict | None = None, body: dict | None = None,
                 headers: dict | None = None):
        """Send one request; return the open response (the caller reads or streams it)."""
        url = self.url + path
        if query:
            query = {k: v for k, v in query.items() if v is not None}
            if query:
                url += "?" + urllib.parse.urlencode(query)
        data = None
        all_headers = {"Accept": "application/json"} | (headers or {})
        if self.key:
            all_headers["Authorization"] = f"Bearer {self.key}"
        if body is not None:
            data = json.dumps(body).encode()
            all_headers["Content-Type"] = "application/json"
        req = urllib.request.Request(url, data=data, method=method, headers=all_headers)
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            raise _api_error(e) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ConnectionFailed(f"cannot reach {self.url}: {reason}") from None

    def _json(self, method: str, path: str, **kwargs) -> dict:
        with self._request(method, path, **kwargs) as resp:
            return json.load(resp)

    # -- jobs -------------------------------------------------------------------------------
    def submit(self, params: dict, idempotency_key: str | None = None) -> dict:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self._json("POST", "/v1/jobs", body=params, headers=headers)

    def list_jobs(self, *, status: str | None = None, model: str | None = None, limit: int | None = None,
             after: str | None = None) -> dict:
        return self._json("GET", "/v1/jobs", query={"status": status, "model": model, "limit": limit, "after": after})

    def get(self, job_id: str) -> dict:
        return self._json("GET", f"/v1/jobs/{_segment(job_id)}")

    def cancel(self, job_id: str) -> dict:
        return self._json("POST", f"/v1/jobs/{_segment(job_id)}/cancel")

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
                 on_chunk=None) -> Path:
        """Stream one artifact to `dest` (a file, or a directory to put `name` in); verify sha256 when given.

        Written to a temporary file first and renamed, so an interrupted download leaves no file that
        looks complete.
        """
        dest = Path(dest)
        if dest.is_dir():
            dest = dest / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.part")
        digest = hashlib.sha256()
        with self._request("GET", f"/v1/jobs/{_segment(job_id)}/artifacts/{_segment(name)}",
                           headers={"Accept": "*/*"}) as resp, open(tmp, "wb") as out:
            while chunk := resp.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
                if on_chunk:
                    on_chunk(len(chunk))
        if sha256 and digest.hexdigest() != sha256:
            tmp.unlink()
            raise ApiError(502, "Bad Gateway", f"{name}: downloaded bytes have sha256 {digest.hexdigest()}, "
                                               f"the server listed {sha256}", code="checksum_mismatch")
        os.replace(tmp, dest)
        return dest

    # -- health -----------------------------------------------------------------------------
    def health(self) -> dict:
        return self._json("GET", "/healthz")


def _segment(value: str) -> str:
    # Quote everything, "/" included: a job id or artifact name is one path segment, never a route.
    return urllib.parse.quote(value, safe="")


def _api_error(e: urllib.error.HTTPError) -> ApiError:
    """Turn an HTTP error into ApiError, reading the problem+json body when there is one."""
    raw = e.read()
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        text = raw.decode(errors="replace").strip()[:500] or None
        return ApiError(e.code, e.reason or "error", text)
    return ApiError(body.get("status", e.code), body.get("title") or e.reason or "error",
                    body.get("detail"), body.get("code"), body.get("errors"))
