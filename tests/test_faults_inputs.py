"""Issue 23, points 6 and 8, against a real `consa serve` over HTTP: hostile request bodies get a 4xx
problem document with a `code` and no server path (lone surrogates were a 500, an unparsable body a 400
without a code, a path outside the roots named the roots); an event stream opened before `consa keys
revoke` stops; a dataset folder's file that links outside the data roots is not read; /readyz says
not ready when the artifact store is short of space."""

import os
import socket
import time

import httpx
import pytest

from service_fixtures import Server, fault_record, run_python, server_env, serving, wait_for, wait_until

pytestmark = pytest.mark.slow  # live servers or CLI subprocesses: out of the fast loop (pytest -m 'not slow'); CI runs it


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_model_dir, text_dir):
    var = tmp_path_factory.mktemp("var-inputs")
    with serving(var, server_env(var, tiny_model_dir, text_dir, worker_heartbeat_s=1), tiny_model_dir, text_dir) as server:
        yield server


def hostile_bodies(model: str) -> dict[str, bytes]:
    job = f'"model": "{model}", "sparsity": 0.5'
    return {
        "lone surrogate in a metadata value": ('{' + job + ', "metadata": {"a": "\\ud800"}}').encode(),
        "lone surrogate in a metadata key": ('{' + job + ', "metadata": {"\\udfff": "a"}}').encode(),
        "lone surrogate in the model": b'{"model": "/m\\ud800", "sparsity": 0.5}',
        "lone surrogate in the dataset": ('{' + job + ', "dataset": "/d\\ud800"}').encode(),
        "lone surrogate key, a number for its value": ('{' + job + ', "metadata": {"\\ud800": 1}}').encode(),
        "lone surrogate as a field name": ('{' + job + ', "\\ud800": 1}').encode(),
        "lone surrogate as a choice": ('{' + job + ', "granularity": "\\ud800"}').encode(),
        "NUL in metadata": ('{' + job + ', "metadata": {"a": "\\u0000"}}').encode(),
        "truncated JSON": b'{"model": ',
        "invalid UTF-8": b'{"model": "\xff\xfe", "sparsity": 0.5}',
        "deep nesting": b'{"metadata": ' + b'[' * 5000 + b']' * 5000 + b'}',
        "not an object": b'[1, 2, 3]',
        "a model outside the roots": b'{"model": "/etc", "sparsity": 0.5}',
        "a dataset outside the roots": ('{' + job + ', "dataset": "/etc"}').encode(),
        "a model up and out": b'{"model": "../../../../etc", "sparsity": 0.5}',
    }


def test_hostile_bodies_get_a_4xx_problem_with_a_code_and_no_server_path(srv):
    roots = [str(srv.var.parent), os.path.dirname(srv.model), os.path.dirname(srv.data)]
    answers = []
    with srv.client(srv.alice) as client:
        for name, body in hostile_bodies(srv.model).items():
            r = client.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
            assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
            assert r.headers["content-type"].startswith("application/problem+json"), (name, r.headers)
            problem = r.json()
            assert problem.get("code"), (name, problem)
            assert not any(root in r.text for root in roots), (name, r.text)
            answers.append(r.status_code)
    fault_record("hostile request bodies", bodies=len(answers), **{f"status_{s}": answers.count(s) for s in set(answers)})


def test_an_event_stream_stops_when_its_key_is_revoked(srv):
    key = srv.create_key("revoked-while-streaming")
    with srv.client(key) as client:
        job = client.post("/v1/jobs", json={"model": srv.model, "dataset": srv.data, "sparsity": 0.5,
                                            "window": 16, "seq_len": 64, "steps": 5000}).json()
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
    try:
        sock.sendall(f"GET /v1/jobs/{job['id']}/events?stream=true HTTP/1.1\r\nHost: x\r\n"
                     f"Authorization: Bearer {key}\r\n\r\n".encode())
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        run_python("from service.keys import revoke_key; revoke_key('revoked-while-streaming')", srv.env)
        revoked = time.monotonic()
        sock.settimeout(1)
        ended = False
        while time.monotonic() - revoked < 15 and not ended:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            ended = chunk == b"" or chunk.endswith(b"0\r\n\r\n")  # closed, or the chunked body's last chunk
        assert ended, "the stream went on after its key was revoked"
        fault_record("event stream of a key revoked while it streams", ended_after_s=round(time.monotonic() - revoked, 1))
    finally:
        sock.close()
    with srv.client(srv.alice) as client:  # the job itself is the key's business no more; stop it
        assert client.get(f"/v1/jobs/{job['id']}").status_code == 404
    run_python(f"from service.db import sessionmaker_for; from service.crud import job_records, job_states; "
               f"from service.settings import get_settings; s = sessionmaker_for(get_settings().database_url)(); "
               f"job_states.request_cancel(s, job=job_records.get_job(s, job_id={job['id']!r}))", srv.env)


def test_a_file_that_links_out_of_the_data_roots_is_not_read(srv, tmp_path_factory):
    secret = tmp_path_factory.mktemp("outside-the-roots") / "secret.py"
    secret.write_text("SECRET = 'read me'\n" * 2000)
    dataset = os.path.join(os.path.dirname(srv.data), "with-a-link")
    os.makedirs(dataset, exist_ok=True)
    os.symlink(secret, os.path.join(dataset, "innocent.py"))
    with open(os.path.join(srv.data, os.listdir(srv.data)[0])) as f, \
            open(os.path.join(dataset, "real.py"), "w") as out:
        out.write(f.read())
    with srv.client(srv.alice) as client:
        job = client.post("/v1/jobs", json={"model": srv.model, "dataset": dataset, "sparsity": 0.5, "window": 16,
                                            "seq_len": 64, "steps": 2}).json()
        done = wait_for(client, job["id"], timeout=120)
    assert done["status"] == "failed", done
    assert done["error"]["type"] == "user" and "innocent.py" in done["error"]["message"], done["error"]
    assert str(secret) not in done["error"]["message"]


def test_readyz_is_not_ready_while_the_artifact_disk_is_short_of_space(srv, tmp_path_factory):
    stat = os.statvfs(srv.var)
    free_mb = stat.f_bavail * stat.f_frsize // 2**20
    var = tmp_path_factory.mktemp("var-full")
    # The same disk, asked for more than it has: what a full disk looks like to the check (statvfs).
    full = Server(server_env(var, srv.model, srv.data, min_free_disk_mb=free_mb + 10**6, worker_heartbeat_s=1),
                  var / "serve.log").start(probe="/healthz")
    try:
        r = wait_until(lambda: (a := httpx.get(full.url + "/readyz", timeout=10)).json()["checks"]["worker"] == "ok"
                       and a, 90, "a live worker")
        assert r.status_code == 503 and r.json()["checks"]["artifacts"].startswith("error: the artifact store has")
        assert str(var) not in r.text
    finally:
        full.stop()
    assert httpx.get(srv.url + "/readyz", timeout=10).json()["checks"]["artifacts"] == "ok"
