"""Real servers for the service tests: `consa serve` (uvicorn + a Celery worker process) in a subprocess,
against the embedded default (SQLite + kombu's SQLAlchemy transport) or against Redis + PostgreSQL.

Each server gets its own var dir, its own Postgres database and its own Celery queue name, so test
sessions running side by side on one machine (other engineers, CI) never see each other's jobs.
"""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = os.environ.get("CONSA_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get("CONSA_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
TERMINAL = ("succeeded", "failed", "cancelled")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_python(code: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, check=True)


# -- PostgreSQL: one throwaway database per server ---------------------------------------------
def create_database(base_url: str) -> tuple[str, str]:
    import sqlalchemy as sa

    name = "consa_test_" + uuid.uuid4().hex[:12]
    engine = sa.create_engine(base_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return base_url.rsplit("/", 1)[0] + "/" + name, name


def drop_database(base_url: str, name: str) -> None:
    import sqlalchemy as sa

    engine = sa.create_engine(base_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


class Server:
    """`consa serve` in a child process; `.client(key)` talks to it over real HTTP."""

    def __init__(self, env: dict, log_path: Path):
        self.env, self.log_path = env, log_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self, timeout: float = 90, probe: str = "/readyz") -> "Server":
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", f"from service.serve import serve; serve('127.0.0.1', {self.port})"],
            env=self.env, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"consa serve exited {self.proc.returncode}:\n{self.log_path.read_text()[-4000:]}")
            try:
                if httpx.get(self.url + probe, timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"consa serve not ready after {timeout}s:\n{self.log_path.read_text()[-4000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # serve() stops its worker on the way out
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # our own session: serve + its worker
                self.proc.wait()
        self.log.close()

    def create_key(self, name: str) -> str:
        out = run_python(f"from service.keys import create_key; create_key({name!r})", self.env).stdout
        return out.strip().splitlines()[-1]

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)


def wait_for(client: httpx.Client, job_id: str, statuses=TERMINAL, timeout: float = 120, poll_s: float = 0.1) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        time.sleep(poll_s)
    raise AssertionError(f"job {job_id} still {job['status']} after {timeout}s")


def assert_problem(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json"), response.headers
    body = response.json()
    assert body["status"] == status and body["title"] and "type" in body
    if code:
        assert body.get("code") == code, body
    return body


@pytest.fixture(scope="module", params=["embedded", "redis-postgres"])
def server(request, tmp_path_factory, tiny_model_dir, text_dir):
    """A running `consa serve` with two API keys (`server.alice`, `server.bob`), per backend."""
    var = tmp_path_factory.mktemp(f"var-{request.param}")
    broken = tiny_model_dir.parent / "not-a-model"
    broken.mkdir(exist_ok=True)
    (broken / "README.md").write_text("this directory holds no model\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSA_")}
    env |= {"CONSA_VAR_DIR": str(var), "CONSA_MODEL_ROOTS": str(tiny_model_dir.parent),
            "CONSA_DATA_ROOTS": str(text_dir.parent), "CONSA_DEFAULT_DATASET": str(text_dir),
            "CONSA_ALLOW_HUB_MODELS": "false", "PYTHONPATH": str(ROOT),
            "CONSA_QUEUE": "gpu-test-" + uuid.uuid4().hex[:8], "OMP_NUM_THREADS": "1"}
    db_name = None
    if request.param == "redis-postgres":
        env["CONSA_DATABASE_URL"], db_name = create_database(POSTGRES_URL)
        env["CONSA_BROKER_URL"] = REDIS_URL
    srv = Server(env, var / "serve.log").start()
    try:
        srv.backend, srv.artifact_dir = request.param, var / "artifacts"
        srv.model, srv.broken_model, srv.data = str(tiny_model_dir), str(broken), str(text_dir)
        srv.alice, srv.bob = srv.create_key("alice"), srv.create_key("bob")
        yield srv
    finally:
        srv.stop()
        if db_name:
            drop_database(POSTGRES_URL, db_name)
            _drop_queue(REDIS_URL, env["CONSA_QUEUE"])


def _drop_queue(url: str, queue: str) -> None:
    """Remove the keys kombu made for this test's queue from the shared Redis."""
    import redis

    client = redis.Redis.from_url(url)
    client.delete(queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")
    client.close()


# -- fault tests: a private server with its own settings -----------------------------------------
def server_env(var: Path, tiny_model_dir, text_dir, **settings) -> dict:
    """The environment of a private `consa serve` (embedded default) with CONSA_<NAME> overrides."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSA_")}
    env |= {"CONSA_VAR_DIR": str(var), "CONSA_MODEL_ROOTS": str(Path(tiny_model_dir).parent),
            "CONSA_DATA_ROOTS": str(Path(text_dir).parent), "CONSA_DEFAULT_DATASET": str(text_dir),
            "PYTHONPATH": str(ROOT), "CONSA_QUEUE": "gpu-test-" + uuid.uuid4().hex[:8], "OMP_NUM_THREADS": "1"}
    return env | {f"CONSA_{k.upper()}": str(v) for k, v in settings.items()}


@contextlib.contextmanager
def serving(var: Path, env: dict, tiny_model_dir, text_dir):
    """A private `consa serve` started with `env`, with key `alice` and the tiny model and text named on
    it (`.model`, `.data`, `.var`, `.artifact_dir`); stopped at the end. Fault-test modules share one each."""
    server = Server(env, var / "serve.log").start()
    try:
        server.alice = server.create_key("alice")
        server.model, server.data, server.var = str(tiny_model_dir), str(text_dir), var
        server.artifact_dir = var / "artifacts"
        yield server
    finally:
        server.stop()


def the_worker(srv, timeout: float = 60) -> int:
    """The pid of the one worker process `consa serve` runs."""
    pids = wait_until(lambda: child_pids(srv.proc.pid), timeout, "serve has a worker child")
    assert len(pids) == 1, pids
    return pids[0]


def child_pids(pid: int) -> list[int]:
    """The direct children of a process (serve's worker)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "(comm)": state, ppid, ...
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            children.append(int(stat.parent.name))
    return children


def wait_until(predicate, timeout: float, what: str, poll_s: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"not within {timeout}s: {what}")


class PrivatePostgres:
    """A PostgreSQL server of the test's own (initdb + pg_ctl on a free port, in a temporary folder), to
    stop and start at will: never the machine's shared one. As root, the server runs as `postgres`."""

    def __init__(self):
        import tempfile

        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="consa-pg-"))
        self.data, self.log = self.dir / "data", self.dir / "server.log"
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        self.as_user = []
        if os.geteuid() == 0:
            import shutil

            shutil.chown(self.dir, "postgres", "postgres")
            self.dir.chmod(0o755)
            self.as_user = ["runuser", "-u", "postgres", "--"]

    def _run(self, *args: str, timeout: float = 60) -> None:
        subprocess.run([*self.as_user, *args], check=True, capture_output=True, timeout=timeout)

    def init(self) -> "PrivatePostgres":
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync", timeout=120)
        return self.start()

    def start(self) -> "PrivatePostgres":
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.log), "-w", "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        import shutil

        try:
            self.stop("immediate")
        except Exception:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


def fault_record(scenario: str, **numbers) -> None:
    """One measured line of a fault test (`pytest -s` shows it); bench/service_faults.py --faults collects them."""
    import json

    print("FAULT_RECORD " + json.dumps({"scenario": scenario, **numbers}), flush=True)
