"""Issue 23, point 4, with real processes: CONSA_TASK_TIME_LIMIT_S holds with the solo pool that `consa
serve` and the compose file run (Celery's time limits need the prefork pool): the runner itself ends
the job at the limit, in the search and in the evaluation, with a message that says why."""

import datetime as dt

import pytest

from service_fixtures import fault_record, server_env, serving, wait_for

pytestmark = pytest.mark.slow  # live servers or CLI subprocesses: out of the fast loop (pytest -m 'not slow'); CI runs it

LIMIT_S = 8


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_model_dir, text_dir):
    var = tmp_path_factory.mktemp("var-limits")
    env = server_env(var, tiny_model_dir, text_dir, task_time_limit_s=LIMIT_S, worker_heartbeat_s=1)
    with serving(var, env, tiny_model_dir, text_dir) as server:
        yield server


def seconds(a: str, b: str) -> float:
    return (dt.datetime.fromisoformat(b) - dt.datetime.fromisoformat(a)).total_seconds()


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["search", "evaluation"])
def test_the_time_limit_ends_a_job_with_the_solo_pool(srv, phase):
    job = {"model": srv.model, "dataset": srv.data, "sparsity": 0.5, "window": 16, "seq_len": 64, "steps": 5000}
    if phase == "evaluation":  # a short search, then a duo baseline that trains far past the limit
        job |= {"steps": 3, "evaluate": True, "duo_steps": 5000}
    with srv.client(srv.alice) as client:
        created = client.post("/v1/jobs", json=job).json()
        done = wait_for(client, created["id"], timeout=120)
    assert done["status"] == "failed", done
    assert done["error"]["code"] == "time_limit_exceeded" and done["error"]["type"] == "user", done
    assert f"{LIMIT_S} s" in done["error"]["message"] and "/" not in done["error"]["message"]
    ran = seconds(done["started_at"], done["finished_at"])
    assert LIMIT_S <= ran < LIMIT_S + 10, ran  # before: a job of minutes ran to its end
    if phase == "evaluation":
        assert (done["progress"] or {}).get("phase") == "evaluation", done["progress"]
    fault_record(f"CONSA_TASK_TIME_LIMIT_S={LIMIT_S}, solo pool, in the {phase}", ended_after_s=round(ran, 1),
                 error=done["error"]["code"])
