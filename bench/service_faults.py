"""Issue 11's load target, measured on a real `consa serve`: GET /v1/jobs/{id} latency while 200 event
streams are open (target: p99 < 1 s), with the default per-key stream cap (8), so 25 keys hold 8 each.

Two scenarios: the streamed jobs are quiet (running, no new events), and the same with a real search
running on the server's worker (the tiny test model), which writes an event per step that 8 of the
streams follow. Writes bench/results/current/service_faults.json.

    python bench/service_faults.py [--streams 200] [--gets 300] [--backend embedded redis-postgres]

The CI test is lighter (tests/test_faults_streams.py: 24 streams over a pool of 3 connections).

With --faults, the fault scenarios of issue 23 instead (each a test of tests/test_faults_*.py, run with real
processes: a worker SIGKILLed in the evaluation and in the export, `consa serve` SIGKILLed and restarted
gracefully, a PostgreSQL restarted mid-job, the time limit with the solo pool, 200 concurrent submits
against the quota, cancels in the evaluation, hostile bodies, a revoked key's stream): each scenario's
measured numbers (the tests' FAULT_RECORD lines), its outcome and its wall time go to
bench/results/current/service_faults_issue23.json.

    python bench/service_faults.py --faults
"""

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import httpx  # noqa: E402

import tiny  # noqa: E402
from service_fixtures import (POSTGRES_URL, REDIS_URL, Server, create_database, drop_database,  # noqa: E402
                              server_env, wait_until)

PER_KEY = 8  # CONSA_MAX_STREAMS_PER_KEY's default


def open_stream(port: int, key: str, job_id: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(f"GET /v1/jobs/{job_id}/events?stream=true HTTP/1.1\r\nHost: x\r\n"
                 f"Authorization: Bearer {key}\r\nAccept: text/event-stream\r\n\r\n".encode())
    head = sock.recv(4096).decode(errors="replace")
    if not head.startswith("HTTP/1.1 200"):
        raise RuntimeError(head[:300])
    sock.setblocking(False)  # never read again: the kernel buffers what the server sends
    return sock


def held_job(database_url: str, key_name: str) -> tuple[str, str]:
    """A key and a job that stays `running` on a worker name that does not exist: its streams stay open
    and poll, and no CPU goes to a search."""
    from service.crud import api_keys, job_records, job_states, outbox
    from service.db import sessionmaker_for

    with sessionmaker_for(database_url)() as session:
        key = api_keys.create_api_key(session, name=key_name)
        row = api_keys.get_api_key(session, key=key)
        job = job_records.create_job(session, api_key_id=row.id, model="m", params={}, meta={})
        outbox.mark_enqueued(session, job_id=job.id)
        job_states.claim_job(session, job_id=job.id, worker="held@bench")
        return key, job.id


def time_gets(url: str, key: str, job_id: str, n: int) -> dict:
    times = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as client:
        for _ in range(n):
            start = time.perf_counter()
            response = client.get(f"/v1/jobs/{job_id}")
            times.append(time.perf_counter() - start)
            assert response.status_code == 200, response.text
            time.sleep(0.02)
    times.sort()
    q = statistics.quantiles(times, n=100)
    return {"n": n, "p50_s": round(q[49], 4), "p90_s": round(q[89], 4), "p99_s": round(q[98], 4),
            "max_s": round(times[-1], 4)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--gets", type=int, default=300)
    parser.add_argument("--backend", choices=["embedded", "redis-postgres"], nargs="+",
                        default=["embedded", "redis-postgres"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/consa-bench-service"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/current/service_faults.json")
    parser.add_argument("--faults", nargs="*", metavar="TEST_FILE",
                        help="run the fault scenarios (default: every tests/test_faults_*.py of issue 23)")
    args = parser.parse_args()
    if args.faults is not None:
        return faults(args.faults or FAULT_TESTS, ROOT / "bench/results/current/service_faults_issue23.json")
    runs = [measure(backend, args) for backend in args.backend]
    record = {"what": "GET /v1/jobs/{id} latency with N open event streams (issue 11 target: p99 < 1 s)",
              "command": "python bench/service_faults.py " + " ".join(sys.argv[1:]),
              "machine": f"{platform.node()} ({platform.machine()}), {os.cpu_count()} cores", "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))


FAULT_TESTS = ["tests/test_faults_resume.py", "tests/test_faults_serve.py", "tests/test_faults_postgres.py",
               "tests/test_faults_limits.py", "tests/test_faults_load.py", "tests/test_faults_evaluation.py",
               "tests/test_faults_inputs.py"]


def faults(files: list[str], out: Path) -> None:
    """Run each fault test (pytest -s, its own temp dir) and keep its FAULT_RECORD lines, outcome and time."""
    import re
    import subprocess

    scenarios = []
    Path("/tmp/consa-bench-faults").mkdir(exist_ok=True)  # pytest makes --basetemp, not its parent
    for file in files:
        start = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "pytest", "-s", "-q", "-rA", "-p", "no:cacheprovider",
                              "--basetemp", f"/tmp/consa-bench-faults/{Path(file).stem}", file],
                             cwd=ROOT, capture_output=True, text=True, timeout=3600)
        report = run.stdout + run.stderr
        outcomes = {name: outcome for outcome, name in re.findall(r"^(PASSED|FAILED|ERROR|SKIPPED) (\S+)", report, re.M)}
        records = [json.loads(line.split("FAULT_RECORD ", 1)[1]) for line in report.splitlines()
                   if "FAULT_RECORD " in line]
        scenarios.append({"file": file, "wall_s": round(time.perf_counter() - start, 1), "tests": outcomes,
                          "records": records})
        print(json.dumps(scenarios[-1]), flush=True)
    record = {"what": "issue 23's fault scenarios, with real processes (tests/test_faults_*.py), their numbers",
              "command": "python bench/service_faults.py " + " ".join(sys.argv[1:]),
              "machine": f"{platform.node()} ({platform.machine()}), {os.cpu_count()} cores, "
                         f"load {os.getloadavg()[0]:.1f} at the end", "scenarios": scenarios}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")


def measure(backend: str, args) -> dict:
    import shutil

    shutil.rmtree(args.work, ignore_errors=True)
    model = tiny.save_tiny(args.work / "models" / "tiny-qwen3")
    data = tiny.write_text_dir(args.work / "data" / "text")
    # A held job's heartbeat never moves: keep the reconciler from settling it during the run.
    settings = dict(stale_after_s=3600)
    db_name = None
    if backend == "redis-postgres":
        settings["database_url"], db_name = create_database(POSTGRES_URL)
        settings["broker_url"] = REDIS_URL
    env = server_env(args.work / "var", model, data, **settings)
    server = Server(env, args.work / "serve.log").start()
    database_url = settings.get("database_url") or f"sqlite:///{args.work / 'var' / 'consa.db'}"
    record = {"backend": backend, "streams": args.streams, "per_key": PER_KEY, "scenarios": {}}
    socks = []
    try:
        keys = [held_job(database_url, f"streamer{i}") for i in range((args.streams + PER_KEY - 1) // PER_KEY)]
        # One prober key per scenario: each stays under the per-key rate limit (600 a minute).
        probers = iter([held_job(database_url, f"prober{i}") for i in range(3)])
        probe_key, probe_job = next(probers)
        record["scenarios"]["no_streams"] = time_gets(server.url, probe_key, probe_job, args.gets)
        start = time.perf_counter()
        for i in range(args.streams):
            key, job_id = keys[i // PER_KEY]
            socks.append(open_stream(server.port, key, job_id))
        record["open_s"] = round(time.perf_counter() - start, 2)
        probe_key, probe_job = next(probers)
        record["scenarios"]["streams_quiet_jobs"] = time_gets(server.url, probe_key, probe_job, args.gets)

        # A real search on the worker, followed by 8 streams of its own key (8 quiet ones closed: 200 in all).
        for sock in socks[:PER_KEY]:
            sock.close()
        del socks[:PER_KEY]
        live_key, _ = held_job(database_url, "live")
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {live_key}"}, timeout=60) as c:
            job = c.post("/v1/jobs", json={"model": str(model), "dataset": str(data), "sparsity": 0.5, "window": 16,
                                           "seq_len": 64, "steps": 20000}).json()
            wait_until(lambda: c.get(f"/v1/jobs/{job['id']}").json()["status"] == "running", 120, "search running")
            for _ in range(PER_KEY):
                socks.append(open_stream(server.port, live_key, job["id"]))
            steps_before = (c.get(f"/v1/jobs/{job['id']}").json().get("progress") or {}).get("step", 0)
            started = time.perf_counter()
            probe_key, probe_job = next(probers)
            record["scenarios"]["streams_with_a_live_search"] = time_gets(server.url, probe_key, probe_job, args.gets)
            steps_after = (c.get(f"/v1/jobs/{job['id']}").json().get("progress") or {}).get("step", 0)
            record["scenarios"]["streams_with_a_live_search"]["search_steps_per_s"] = round(
                (steps_after - steps_before) / (time.perf_counter() - started), 2)
            c.post(f"/v1/jobs/{job['id']}/cancel")
    finally:
        for sock in socks:
            sock.close()
        server.stop()
        if db_name:
            drop_database(POSTGRES_URL, db_name)
    return record


if __name__ == "__main__":
    main()
