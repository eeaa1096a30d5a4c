"""`consa jobs ...` and consa.cli.client over real HTTP against a real `consa serve` (API + Celery worker
process, embedded SQLite broker) running a tiny random model."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from consa.cli import jobs as jobs_cli
from consa.cli.client import ApiError, Client
from service_fixtures import ROOT, Server, wait_until

pytestmark = pytest.mark.slow  # live servers or CLI subprocesses: out of the fast loop (pytest -m 'not slow'); CI runs it

SMALL = {"sparsity": 0.5, "granularity": "kv_head", "window": 16, "seq_len": 64, "steps": 6, "lr": 0.2}
_shared = {}


def shared_server(config, tmp_path_factory, tiny_model_dir, text_dir) -> Server:
    """One embedded server for this module and test_dashboard.py: each start costs a worker's torch import."""
    if "server" not in _shared:
        var = tmp_path_factory.mktemp("var-client")
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONSA_")}
        env |= {"CONSA_VAR_DIR": str(var), "CONSA_MODEL_ROOTS": str(tiny_model_dir.parent),
                "CONSA_DATA_ROOTS": str(text_dir.parent), "CONSA_DEFAULT_DATASET": str(text_dir),
                "CONSA_ALLOW_HUB_MODELS": "false", "PYTHONPATH": str(ROOT),
                "CONSA_QUEUE": "gpu-test-" + uuid.uuid4().hex[:8], "OMP_NUM_THREADS": "1"}
        srv = Server(env, var / "serve.log").start()
        srv.model, srv.data = str(tiny_model_dir), str(text_dir)
        srv.alice, srv.bob = srv.create_key("alice"), srv.create_key("bob")
        _shared["server"] = srv
        config.add_cleanup(lambda: stop_server(srv))  # once, at the end of the run, whichever module started it
    return _shared["server"]


def stop_server(srv: Server) -> None:
    srv.stop()
    # uvicorn re-raises SIGTERM after its graceful shutdown, so `serve` can die before it stops its
    # Celery worker; the worker shares serve's process group (its own session), so end the group.
    try:
        os.killpg(srv.proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="session")
def jobs_server(request, tmp_path_factory, tiny_model_dir, text_dir):
    return shared_server(request.config, tmp_path_factory, tiny_model_dir, text_dir)


@pytest.fixture
def cli(jobs_server, monkeypatch, capsys):
    """Run `consa jobs ...` in this process as alice; returns (exit code, stdout, stderr)."""
    monkeypatch.setenv("CONSA_URL", jobs_server.url)
    monkeypatch.setenv("CONSA_API_KEY", jobs_server.alice)

    def run(*argv):
        code = jobs_cli.main(["jobs", *map(str, argv)])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def submit_args(server, **fields):
    args = ["--model", server.model, "--dataset", server.data]
    for name, value in (SMALL | fields).items():
        args += [f"--{name.replace('_', '-')}", value]
    return args


def test_submit_wait_list_get_logs_download(cli, jobs_server, tmp_path):
    code, out, err = cli("submit", *submit_args(jobs_server), "--metadata", "run=cli", "--wait", "--interval", "0.2")
    assert code == 0, err
    job_id = out.split()[0]
    assert "succeeded" in out and job_id.startswith("job_")
    # A tqdm bar per phase on stderr: the search's steps reached the total, with loss and sparsity
    # shown, then the export's two stages (pack + tar), each under its own label.
    assert f"{SMALL['steps']}/{SMALL['steps']}" in err and "loss=" in err and "sparsity=" in err
    assert f"{job_id} search" in err and f"{job_id} export" in err and "2/2" in err, err
    assert err.index(f"{job_id} search") < err.index(f"{job_id} export")

    code, out, _ = cli("list", "--limit", "5")
    assert code == 0 and job_id in out
    code, out, _ = cli("get", job_id)
    assert code == 0 and f"step {SMALL['steps']}/{SMALL['steps']}" in out and "export 2/2" in out, out
    code, out, _ = cli("get", job_id, "--json")
    job = json.loads(out)
    assert job["status"] == "succeeded" and job["metadata"] == {"run": "cli"}
    assert job["progress"]["step"] == SMALL["steps"]

    code, out, _ = cli("logs", job_id)
    assert code == 0 and "job running" in out and f"step {SMALL['steps']}/{SMALL['steps']}" in out
    assert out.strip().splitlines()[-1].endswith("job succeeded")

    # All artifacts into a directory: the bytes match the sha256 the server lists.
    code, out, err = cli("download", job_id, "-o", tmp_path / "all")
    assert code == 0, err
    listed = Client(jobs_server.url, jobs_server.alice).artifacts(job_id)
    assert {"manifest.json", "gates.safetensors"} <= {a["name"] for a in listed}
    for a in listed:
        data = (tmp_path / "all" / a["name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == a["sha256"] and len(data) == a["size"]
    # One artifact to a chosen file name.
    code, _, _ = cli("download", job_id, "manifest.json", "-o", tmp_path / "m.json")
    assert code == 0 and json.loads((tmp_path / "m.json").read_text())["format"] == "consa.allocation/v1"
    code, _, err = cli("download", job_id, "nope.bin")
    assert code == jobs_cli.EXIT_API and "no artifact 'nope.bin'" in err and "manifest.json" in err
    # An interrupted download left half the gates: the service's Range support sends only the rest.
    gates = next(a for a in listed if a["name"] == "gates.safetensors")
    whole = (tmp_path / "all" / "gates.safetensors").read_bytes()
    (tmp_path / "resume").mkdir()
    (tmp_path / "resume" / f".gates.safetensors.{gates['sha256'][:16]}.part").write_bytes(whole[: len(whole) // 2])
    fetched = []
    path = Client(jobs_server.url, jobs_server.alice).download(job_id, "gates.safetensors", tmp_path / "resume",
                                                                sha256=gates["sha256"], size=gates["size"],
                                                                on_chunk=fetched.append)
    assert path.read_bytes() == whole and sum(fetched) == len(whole) - len(whole) // 2


def test_every_search_setting_is_a_jobs_submit_flag():
    import argparse

    from consa.core.config import setting_fields

    parser = argparse.ArgumentParser()
    submit = jobs_cli.add_jobs_commands(parser.add_subparsers(dest="command")).\
        _subparsers._group_actions[0].choices["submit"]
    flags = {opt for action in submit._actions for opt in action.option_strings}
    from consa.core.config import RunOptions

    for name, *_ in [*setting_fields(), *setting_fields(RunOptions)]:
        assert "--" + name.replace("_", "-") in flags, name
    # Left out, a setting stays None so the server's defaults apply; bounds are checked at parse time.
    args = parser.parse_args(["jobs", "submit", "--model", "m", "--sparsity", "0.5"])
    assert all(getattr(args, name) is None for name, *_ in setting_fields() if name not in ("model", "sparsity"))
    with pytest.raises(SystemExit):
        parser.parse_args(["jobs", "submit", "--model", "m", "--sparsity", "1.5"])


def test_run_options_given_to_jobs_submit_reach_the_job(cli, jobs_server):
    code, out, err = cli("submit", *submit_args(jobs_server), "--no-heatmap", "--wait", "--interval", "0.2")
    assert code == 0, err
    names = {a["name"] for a in Client(jobs_server.url, jobs_server.alice).artifacts(out.split()[0])}
    assert "manifest.json" in names and "heatmap.png" not in names


def test_cancel_and_follow_logs_until_the_end(cli, jobs_server):
    code, out, _ = cli("submit", *submit_args(jobs_server, steps=5000))
    job_id = out.split()[0]
    client = Client(jobs_server.url, jobs_server.alice)
    wait_until(lambda: (client.get(job_id)["progress"] or {}).get("step", 0) >= 1, 120, "the job's first step")
    code, out, _ = cli("cancel", job_id)
    assert code == 0 and ("cancel_requested" in out or "cancelled" in out)
    # --follow returns by itself once the job has ended, and the last line says how.
    code, out, _ = cli("logs", job_id, "--follow", "--interval", "0.2")
    assert code == 0 and out.strip().splitlines()[-1].endswith("job cancelled")
    assert client.get(job_id)["status"] == "cancelled"
    # An ended job can be deleted; then it is gone for the CLI too.
    code, out, _ = cli("delete", job_id)
    assert code == 0 and out.strip() == f"{job_id}  deleted"
    code, _, err = cli("get", job_id)
    assert code == jobs_cli.EXIT_API and "404" in err


def test_wait_on_a_failing_job_exits_1_with_its_error(cli, jobs_server):
    broken = Path(jobs_server.model).parent / "not-a-model-client"  # inside the allowed model root, no model
    broken.mkdir(exist_ok=True)
    code, out, err = cli("submit", *submit_args(jobs_server), "--model", broken, "--wait", "--interval", "0.2")
    assert code == jobs_cli.EXIT_JOB_FAILED
    assert "failed" in out and "error" in out


def test_problem_json_errors_become_messages_and_exit_codes(cli, jobs_server, monkeypatch):
    # The server's own 422 for what the CLI lets through (the CLI checks bounds itself, as above).
    with pytest.raises(ApiError) as e:
        Client(jobs_server.url, jobs_server.alice).submit({"model": jobs_server.model, "sparsity": 1.5})
    assert e.value.status == 422 and "sparsity" in e.value.detail

    code, _, err = cli("get", "job_doesnotexist")
    assert code == jobs_cli.EXIT_API and "(404)" in err and "job_doesnotexist" in err

    # Another key's job answers exactly like a missing one.
    job = Client(jobs_server.url, jobs_server.bob).submit({"model": jobs_server.model, **SMALL, "steps": 1})
    code, _, err = cli("get", job["id"])
    assert code == jobs_cli.EXIT_API and "(404)" in err

    code, _, err = cli("list", "--key", "consa_wrong")
    assert code == jobs_cli.EXIT_API and "(401)" in err and "check the API key" in err

    with pytest.raises(ApiError) as e:
        Client(jobs_server.url, jobs_server.alice).submit({"model": jobs_server.model, "sparsity": 0.5,
                                                           "granularity": "row"})
    assert e.value.status == 422 and e.value.code == "validation_error" and "granularity" in e.value.detail


def test_usage_and_connection_errors_exit_codes(tmp_path):
    # As a real process: sys.exit carries the code, and nothing but the message reaches stderr.
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSA_")} | {"PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "consa.cli.jobs", "jobs", "list"]
    no_key = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert no_key.returncode == jobs_cli.EXIT_USAGE and "no API key" in no_key.stderr
    env |= {"CONSA_API_KEY": "consa_x", "CONSA_URL": "http://127.0.0.1:9"}  # nothing listens on port 9
    down = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert down.returncode == jobs_cli.EXIT_UNREACHABLE and "cannot reach http://127.0.0.1:9" in down.stderr
    assert "Traceback" not in down.stderr


def test_the_wait_bars_show_each_phase_in_order_and_fill_a_phase_that_ended_between_polls(capsys):
    from tqdm import tqdm

    bars = jobs_cli.PhaseBars("job_x", tqdm)
    assert not bars.show({"status": "queued", "progress": None})
    last = {"step": 10, "total_steps": 10, "loss": 1.5, "sparsity": 0.5}
    for progress in [{"step": 3, "total_steps": 10, "loss": 2.0, "sparsity": 0.1, "phase": "search",
                      "phase_done": 3, "phase_total": 10},
                     last | {"phase": "evaluation", "phase_done": 2, "phase_total": 5},
                     last | {"phase": "export", "phase_done": 1, "phase_total": 2}]:
        assert bars.show({"status": "running", "progress": progress})
    bars.close()
    err = capsys.readouterr().err
    # The search was last seen at 3/10 and the evaluation at 2/5: each is drawn full once the next began.
    assert "10/10" in err and "5/5" in err and "1/2" in err, err
    order = [err.index(f"job_x {phase}") for phase in ("search", "evaluation", "export")]
    assert order == sorted(order) and "allocation" in err and "stage" in err

    # A job first seen after its search (a short search, a slow poll) still shows the search as done.
    bars = jobs_cli.PhaseBars("job_y", tqdm)
    bars.show({"status": "running", "progress": last | {"phase": "export", "phase_done": 2, "phase_total": 2}})
    bars.close()
    err = capsys.readouterr().err
    assert "job_y search" in err and "10/10" in err and "job_y export" in err
