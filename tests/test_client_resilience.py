"""consa.cli.client against a real HTTP server that misbehaves: connections dropped mid-body, 5xx/429,
a server that goes away and comes back. The server is a small http.server in a thread."""

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from consa.cli import jobs as jobs_cli
from consa.cli.client import ApiError, Client, ConnectionFailed

BLOB = bytes(range(256)) * 4096  # 1 MiB
SHA = hashlib.sha256(BLOB).hexdigest()


class Flaky(BaseHTTPRequestHandler):
    """Scripted answers per path; `script[path]` is a list of actions consumed one per request."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _next(self):
        self.server.seen.append((self.command, self.path, dict(self.headers)))
        actions = self.server.script.get((self.command, self.path), [])
        return actions.pop(0) if len(actions) > 1 else (actions[0] if actions else "ok")

    def _json(self, status, body, headers=()):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        action = self._next()
        if action == "reset":  # close without a response: the client sees the connection dropped
            self.close_connection = True
            return
        if isinstance(action, int):
            return self._json(action, {"status": action, "title": "busy"}, [("Retry-After", "0")])
        if self.path.endswith("/artifacts/blob"):
            return self._blob(cut=action == "cut")
        self._json(200, self.server.jobs.get(self.path, {"ok": True}))

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        action = self._next()
        if isinstance(action, int):
            return self._json(action, {"status": action, "title": "busy"})
        self._json(202, {"id": "j1", "status": "queued", "model": "m"})

    def _blob(self, cut: bool):
        start = 0
        if "Range" in self.headers and self.headers.get("If-Range", f'"{SHA}"') == f'"{SHA}"':
            start = int(self.headers["Range"].split("=")[1].rstrip("-"))
        body = BLOB[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body)))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(BLOB) - 1}/{len(BLOB)}")
        self.send_header("ETag", f'"{SHA}"')
        self.end_headers()
        if cut:  # a third of the promised bytes, then the connection drops
            self.wfile.write(body[: len(body) // 3])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


def start(port=0, script=None, jobs=None):
    srv = ThreadingHTTPServer(("127.0.0.1", port), Flaky)
    srv.script, srv.jobs, srv.seen = script or {}, jobs or {}, []
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


@pytest.fixture
def server():
    srv = start()
    yield srv
    srv.shutdown()
    srv.server_close()


def client_for(srv, **kw):
    return Client(f"http://127.0.0.1:{srv.server_address[1]}", "key", timeout=5, backoff_s=0.01, **kw)


def test_download_resumes_with_range_after_a_dropped_connection(server, tmp_path):
    path = "/v1/jobs/j1/artifacts/blob"
    server.script[("GET", path)] = ["cut", "cut", "ok"]
    got = client_for(server).download("j1", "blob", tmp_path, sha256=SHA, size=len(BLOB), progress=True)
    assert got.read_bytes() == BLOB and not (tmp_path / ".blob.part").exists()
    ranges = [h.get("Range") for m, p, h in server.seen if p == path]
    third = len(BLOB) // 3
    assert ranges == [None, f"bytes={third}-", f"bytes={third + (len(BLOB) - third) // 3}-"]
    assert all(h.get("If-Range") == f'"{SHA}"' for m, p, h in server.seen if p == path and h.get("Range"))


PART = f".blob.{SHA[:16]}.part"


def test_download_continues_a_part_file_left_by_an_earlier_run(server, tmp_path):
    (tmp_path / PART).write_bytes(BLOB[:1000])
    got = client_for(server).download("j1", "blob", tmp_path / "blob", sha256=SHA, size=len(BLOB))
    assert got.read_bytes() == BLOB
    assert [h.get("Range") for _, _, h in server.seen] == ["bytes=1000-"]


def test_a_part_of_another_version_is_not_continued(server, tmp_path):
    (tmp_path / ".blob.0123456789abcdef.part").write_bytes(b"x" * 10)  # an older version's bytes
    got = client_for(server).download("j1", "blob", tmp_path, sha256=SHA, size=len(BLOB))
    assert got.read_bytes() == BLOB and [h.get("Range") for _, _, h in server.seen] == [None]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob"]


def test_a_corrupt_part_fails_the_checksum_and_is_removed(server, tmp_path):
    (tmp_path / PART).write_bytes(b"x" * 10)
    with pytest.raises(ApiError, match="sha256") as e:
        client_for(server).download("j1", "blob", tmp_path, sha256=SHA, size=len(BLOB))
    assert e.value.code == "checksum_mismatch" and list(tmp_path.iterdir()) == []
    assert client_for(server).download("j1", "blob", tmp_path, sha256=SHA, size=len(BLOB)).read_bytes() == BLOB


@pytest.mark.parametrize("failures", [["reset"], [503], [429], [502, 500]])
def test_idempotent_calls_retry_transient_failures(server, failures):
    server.script[("GET", "/v1/jobs/j1")] = [*failures, "ok"]
    server.jobs["/v1/jobs/j1"] = {"id": "j1", "status": "running"}
    assert client_for(server).get("j1")["status"] == "running"
    assert len(server.seen) == len(failures) + 1


def test_retries_give_up_after_the_budget(server):
    server.script[("GET", "/v1/jobs/j1")] = [503] * 10
    with pytest.raises(ApiError) as e:
        client_for(server, retries=2).get("j1")
    assert e.value.status == 503 and len(server.seen) == 3


def test_submit_retries_only_with_an_idempotency_key(server):
    server.script[("POST", "/v1/jobs")] = [502, "ok"]
    with pytest.raises(ApiError):
        client_for(server).submit({"model": "m", "sparsity": 0.5})  # no key: a retry could submit twice
    server.script[("POST", "/v1/jobs")] = [502, "ok"]
    assert client_for(server).submit({"model": "m", "sparsity": 0.5}, idempotency_key="k1")["id"] == "j1"
    keys = [h.get("Idempotency-Key") for m, _, h in server.seen if m == "POST"]
    assert keys == [None, "k1", "k1"]


def test_jobs_submit_sends_a_generated_idempotency_key(server, monkeypatch, capsys):
    monkeypatch.setenv("CONSA_URL", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("CONSA_API_KEY", "key")
    server.script[("POST", "/v1/jobs")] = [503, "ok"]  # the first answer is lost: the retry is the same submit
    assert jobs_cli.main(["jobs", "submit", "--model", "m", "--sparsity", "0.5"]) == 0
    keys = [h.get("Idempotency-Key") for m, path, h in server.seen if m == "POST" and path == "/v1/jobs"]
    assert len(keys) == 2 and keys[0] and keys[0] == keys[1]


def test_wait_survives_a_server_restart(monkeypatch, capsys):
    first = start(jobs={"/v1/jobs/j1": {"id": "j1", "status": "running", "model": "m",
                                        "progress": {"step": 3, "total_steps": 10}}})
    port = first.server_address[1]
    polls = []

    def restart_after_a_few_polls(get):
        def wrapped(job_id):
            polls.append(job_id)
            if len(polls) == 2:  # the server goes away mid-wait...
                first.shutdown()
                first.server_close()
            if len(polls) == 4:  # ...and comes back on the same port, with the job finished
                started.append(start(port, jobs={"/v1/jobs/j1": {"id": "j1", "status": "succeeded", "model": "m",
                                                                  "progress": {"step": 10, "total_steps": 10}}}))
            return get(job_id)
        return wrapped

    started = []
    client = Client(f"http://127.0.0.1:{port}", "key", timeout=5, backoff_s=0.01, retries=0)
    client.get = restart_after_a_few_polls(client.get)
    monkeypatch.setattr(jobs_cli.time, "sleep", lambda s: None)
    try:
        job = jobs_cli.wait_with_progress(client, "j1", poll_s=0.01)
    finally:
        for srv in started:
            srv.shutdown()
            srv.server_close()
    assert job["status"] == "succeeded"
    err = capsys.readouterr().err
    assert "server unavailable" in err and "server back" in err


def test_wait_gives_up_after_its_patience(monkeypatch):
    srv = start()
    port = srv.server_address[1]
    srv.shutdown()
    srv.server_close()
    clock = iter(range(0, 10_000, 100))
    monkeypatch.setattr(jobs_cli.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(jobs_cli.time, "sleep", lambda s: None)
    with pytest.raises(ConnectionFailed):
        jobs_cli.wait_with_progress(Client(f"http://127.0.0.1:{port}", "key", retries=0), "j1", patience_s=250)


def test_jobs_download_waits_out_a_server_restart_and_resumes_with_range(tmp_path, monkeypatch, capsys):
    """The server dies a third of the way into the artifact and comes back on the same port a moment
    later: `consa jobs download` waits for it and asks only for the rest."""
    listing = {"/v1/jobs/j1/artifacts": {"data": [{"name": "blob", "size": len(BLOB), "sha256": SHA}]}}
    first = start(script={("GET", "/v1/jobs/j1/artifacts/blob"): ["cut"]}, jobs=listing)
    port, later = first.server_address[1], []

    def die_then_come_back():
        first.shutdown()
        first.server_close()
        threading.Timer(1.0, lambda: later.append(start(port, jobs=listing))).start()

    real_blob = Flaky._blob

    def blob_then_die(self, cut):
        real_blob(self, cut)
        if cut:
            threading.Thread(target=die_then_come_back).start()

    monkeypatch.setattr(Flaky, "_blob", blob_then_die)
    # No retries inside the client: the outage outlasts them, as a real restart outlasts its ~15 s.
    monkeypatch.setattr(jobs_cli, "Client", lambda url, key: Client(url, key, timeout=5, retries=0))
    monkeypatch.setenv("CONSA_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("CONSA_API_KEY", "key")
    try:
        code = jobs_cli.main(["jobs", "download", "j1", "blob", "-o", str(tmp_path / "blob"), "--interval", "0.5"])
    finally:
        for srv in later:
            srv.shutdown()
            srv.server_close()
    assert code == 0 and (tmp_path / "blob").read_bytes() == BLOB
    ranges = [h.get("Range") for m, p, h in later[0].seen if p.endswith("/blob")]
    assert ranges == [f"bytes={len(BLOB) // 3}-"]  # only the rest, from the restarted server
    err = capsys.readouterr().err
    assert "server unavailable" in err and "server back" in err
