"""openapi.yaml matches what the live server does (issue 11): schemathesis, `--checks all`, against a real
`consa serve` (embedded default), 0 failures. Bounded (`--max-examples`) to about a minute on 2 cores.

Two runs: examples/coverage/fuzzing with the path parameters pointed at real jobs (a finished one with
artifacts; DELETE gets its own, so it cannot delete the one the other operations read), and the
stateful phase without them (it follows POST /v1/jobs -> the job's operations through the links
schemathesis infers; a fixed job_id would make it look up the wrong job).

The schema is the one the live server serves (/openapi.json): it states this server's bounds on a job
(CONSA_MAX_STEPS, _SEQ_LEN, _BATCH_SIZE as maxima, a default above one as the bound), so a schema-valid
job is within them. A cursor `after` that names no job of this key is an empty page. What the schema
cannot say, and the server answers with a documented 4xx: a model that is not under a model root (422
on POST /v1/jobs and /v1/jobs/estimate: the schema only says "a string"). Only that status is added to
the positive-data check, only for those operations.
"""

import re
import subprocess
import sys

import pytest

from service_fixtures import Server, server_env, wait_for

MAX_EXAMPLES = 25
TINY_JOB = dict(sparsity=0.5, window=16, seq_len=64, steps=3)


@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_model_dir, text_dir):
    var = tmp_path_factory.mktemp("var-schemathesis")
    # schemathesis sends hundreds of requests a second; the per-key limiter has its own test. The jobs it
    # manages to submit really run on this machine's worker: small bounds keep each one seconds long, and
    # the served schema states them.
    env = server_env(var, tiny_model_dir, text_dir, rate_limit_per_minute=0, max_steps=50, max_seq_len=256,
                     max_batch_size=4)
    server = Server(env, var / "serve.log").start()
    try:
        server.key = server.create_key("schemathesis")
        with server.client(server.key) as client:
            jobs = [client.post("/v1/jobs", json={"model": str(tiny_model_dir), "dataset": str(text_dir), **TINY_JOB})
                    .json()["id"] for _ in range(2)]
            for job_id in jobs:
                assert wait_for(client, job_id, timeout=120)["status"] == "succeeded"
        server.read_job, server.delete_job = jobs
        yield server
    finally:
        server.stop()


def config(tmp_path, *, job_id: str | None = None, delete_job_id: str | None = None):
    lines = []
    if job_id:
        lines += ["[parameters]", f'job_id = "{job_id}"', 'name = "manifest.json"', ""]
    for operation in ("POST /v1/jobs", "POST /v1/jobs/estimate"):  # the same body, the same model roots
        lines += ['[[operations]]', f'include-name = "{operation}"',
                  'checks.positive_data_acceptance.expected-statuses = ["2XX", 401, 403, 404, 409, 422, 429]', ""]
    if delete_job_id:
        lines += ['[[operations]]', 'include-name = "DELETE /v1/jobs/{job_id}"',
                  f'parameters = {{ job_id = "{delete_job_id}" }}', ""]
    path = tmp_path / ("with-jobs.toml" if job_id else "stateful.toml")
    path.write_text("\n".join(lines))
    return path


def schemathesis(live, config_path, phases: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config_path), "run", live.url + "/openapi.json",
         "--url", live.url, "-H", f"Authorization: Bearer {live.key}", "--checks", "all", "--phases", phases,
         "--max-examples", str(MAX_EXAMPLES), "--seed", "1", "--no-color", "--request-timeout", "30"],
        cwd=config_path.parent, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_schemathesis_finds_no_failure_on_the_live_server(live, tmp_path):
    for path, phases in [(config(tmp_path, job_id=live.read_job, delete_job_id=live.delete_job),
                          "examples,coverage,fuzzing"),
                         (config(tmp_path), "stateful")]:
        run = schemathesis(live, path, phases)
        report = run.stdout + run.stderr
        assert run.returncode == 0, report[-6000:]
        summary = report.split("SUMMARY")[-1]
        assert "failure" not in summary.replace("0 failures", ""), report[-3000:]
        generated = re.search(r"(\d+) generated", summary)
        assert generated and int(generated.group(1)) >= 20, summary  # it did send requests
