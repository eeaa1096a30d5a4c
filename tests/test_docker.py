"""docker/: the compose files are checked against the compose-spec JSON schema plus the rules this
deployment relies on, and every command the images run is checked against the package (the module,
attribute or file it names exists; the migration really runs). These run everywhere.

`test_smoke_stack_end_to_end` (marker `docker`) runs docker/smoke.sh: the images built, the stack up,
a job through it, restarts, a killed and a stopped worker, a stopped API, and everything torn down
(about 10 minutes). It runs when asked for, `pytest -m docker tests/test_docker.py` (or
CONSA_DOCKER_SMOKE=1), and a Docker engine answers; otherwise it skips and says why (CI has no engine)."""

import importlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
# The official compose-spec schema, as vendored in the docker-compose 1.29.2 wheel (Apache-2.0).
SCHEMA = json.loads((Path(__file__).parent / "data" / "compose_spec.json").read_text())


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def merge(base, override):
    """Compose's merge of an override file, as far as these files use it: mappings merge key by key,
    anything else is replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        return {k: merge(base[k], v) if k in base else v for k, v in override.items()} | \
               {k: v for k, v in base.items() if k not in override}
    return override


@pytest.fixture(scope="module")
def local_stack(compose):
    """compose.yaml + compose.local.yaml + compose.smoke.yaml, as docker/smoke.sh starts them."""
    merged = compose
    for name in ("compose.local.yaml", "compose.smoke.yaml"):
        merged = merge(merged, yaml.safe_load((DOCKER / name).read_text()))
    return merged


def dockerfile(name: str) -> str:
    # Join continuation lines so every instruction is one line.
    return (DOCKER / name).read_text().replace("\\\n", " ")


def instructions(name: str, keyword: str) -> list[str]:
    return [line.split(None, 1)[1] for line in dockerfile(name).splitlines() if line.startswith(keyword + " ")]


def image_commands(compose) -> dict[str, list[str]]:
    """Every argv an image runs: the Dockerfile CMDs and each compose service's command."""
    cmds = {f"{name}:CMD": json.loads(instructions(name, "CMD")[-1]) for name in ("api.Dockerfile", "worker.Dockerfile")}
    for svc, spec in compose["services"].items():
        if "command" in spec and str(spec.get("image", "")).startswith("consa-"):
            cmd = spec["command"]
            cmds[svc] = shlex.split(cmd) if isinstance(cmd, str) else cmd
    return cmds


# -- the compose file -------------------------------------------------------------------------
def test_compose_matches_compose_spec_schema(compose):
    jsonschema.Draft201909Validator.check_schema(SCHEMA)
    jsonschema.Draft201909Validator(SCHEMA).validate(compose)


def test_schema_check_rejects_a_misspelt_key(compose):
    # The check above would be worthless if the schema let anything through.
    broken = json.loads(json.dumps(compose))
    broken["services"]["api"]["helthcheck"] = broken["services"]["api"].pop("healthcheck")
    assert list(jsonschema.Draft201909Validator(SCHEMA).iter_errors(broken))


def test_depends_on_waits_for_health_and_for_migrations(compose):
    services = compose["services"]
    for name, spec in services.items():
        for dep, cond in (spec.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy, but it has no healthcheck"
            if cond["condition"] == "service_completed_successfully":
                assert services[dep].get("restart") == "no", f"{dep} is one-shot and must not restart"
    workers = [n for n in services if n.startswith("worker")]
    assert workers
    for name in ["api", *workers]:
        deps = services[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully"
        assert deps["postgres"]["condition"] == deps["redis"]["condition"] == "service_healthy"
    assert services["migrate"]["command"][:1] == ["alembic"]


def test_one_worker_per_gpu(compose):
    workers = {n: s for n, s in compose["services"].items() if n.startswith("worker")}
    seen = []
    for name, spec in workers.items():
        (device,) = spec["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
        assert len(device["device_ids"]) == 1, f"{name} must reserve exactly one GPU"
        seen += device["device_ids"]
        cmd = spec["command"]
        assert cmd[cmd.index("--pool") + 1] == "solo" and cmd[cmd.index("--prefetch-multiplier") + 1] == "1"
        assert cmd[cmd.index("--concurrency") + 1] == "1"
    assert len(seen) == len(set(seen)), "two workers reserve the same GPU"


def test_redis_postgres_and_volumes(compose):
    services = compose["services"]
    redis_cmd = services["redis"]["command"]
    assert redis_cmd[redis_cmd.index("--maxmemory-policy") + 1] == "noeviction"
    assert redis_cmd[redis_cmd.index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") for v in services["redis"]["volumes"])
    assert any(v.endswith(":/var/lib/postgresql/data") for v in services["postgres"]["volumes"])
    named = set(compose["volumes"])
    for name, spec in services.items():
        for volume in spec.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/", "$")):
                assert source in named, f"{name} mounts undeclared volume {source}"
    # The API serves the artifacts the workers write: both mount the same named volume there.
    artifact_dir = services["api"]["environment"]["CONSA_ARTIFACT_DIR"]
    for name in ["api", *[n for n in services if n.startswith("worker")]]:
        assert f"artifacts:{artifact_dir}" in services[name]["volumes"], name


def test_consa_environment_names_real_settings(compose):
    # Settings ignore unknown CONSA_* variables, so a typo here would silently fall back to a default.
    from service.settings import Settings

    fields = {f"CONSA_{name.upper()}" for name in Settings.model_fields}
    for name, spec in compose["services"].items():
        for var in spec.get("environment") or {}:
            if var.startswith("CONSA_"):
                assert var in fields, f"{name}: {var} is not a consa setting"
    env = compose["services"]["api"]["environment"]
    assert env["CONSA_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert env["CONSA_BROKER_URL"].startswith("redis://redis:")


def test_build_contexts_and_dockerfiles_exist(compose):
    for name, spec in compose["services"].items():
        if "build" in spec:
            context = (DOCKER / spec["build"]["context"]).resolve()
            assert context == ROOT, name
            assert (context / spec["build"]["dockerfile"]).is_file(), name


# -- the images -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["api.Dockerfile", "worker.Dockerfile"])
def test_images_run_as_non_root_and_copy_real_paths(name):
    users = instructions(name, "USER")
    assert users and users[-1] not in ("root", "0"), f"{name} must end as a non-root user"
    ignore = (DOCKER / f"{name}.dockerignore").read_text().splitlines()
    for copy in instructions(name, "COPY"):
        for src in copy.split()[:-1]:
            assert (ROOT / src).exists(), f"{name} copies {src}, which is not in the repository"
            assert f"!{src.rstrip('/')}" in ignore or f"!{src.rstrip('/')}/" in ignore, \
                f"{name}.dockerignore leaves {src} out of the build context"


def test_api_image_has_no_torch_and_worker_image_has_cuda_by_default():
    api = dockerfile("api.Dockerfile")
    api_base = re.search(r"ARG BASE=(\S+)", api).group(1)
    assert api_base == "python:3.12-slim" and instructions("api.Dockerfile", "FROM") == ["${BASE}"]
    # The project without its dependencies, over its dependencies minus torch; the build checks it.
    assert "pip install --no-deps ." in api and "['optional-dependencies']['api']" in api
    assert "p['dependencies']" not in api and "! python -c 'import torch'" in api
    assert "download.pytorch.org" not in api
    worker = dockerfile("worker.Dockerfile")
    base = re.search(r"ARG BASE=(\S+)", worker).group(1)
    assert "cuda" in base and base.startswith("pytorch/pytorch:")
    assert instructions("worker.Dockerfile", "FROM") == ["${BASE}"]
    assert re.search(r"ARG VARIANT=gpu\b", worker) and re.search(r"ARG FLASH_ATTN=0", worker) and "flash-attn" in worker
    # The cpu variant: a wheel from docker/wheels/, else the CPU index; never PyPI's (CUDA) torch.
    assert re.search(r"ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu", worker)
    assert "COPY docker/wheels/ /tmp/wheels/" in worker and (DOCKER / "wheels" / "README.md").is_file()


@pytest.mark.parametrize("name", ["api.Dockerfile", "worker.Dockerfile", "local/postgres.Dockerfile",
                                  "local/redis.Dockerfile"])
def test_base_image_and_package_index_are_build_arguments(name):
    text = dockerfile(name)
    lines = text.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("FROM "))
    assert re.match(r"ARG BASE=\S+$", lines[first - 1]) and lines[first] == "FROM ${BASE}", name
    if not name.startswith("local/"):
        assert re.search(r"^ARG PIP_INDEX_URL=https://pypi\.org/simple$", text, re.M), name


def test_root_dockerignore_matches_the_per_dockerfile_ones():
    # The classic builder (docker-compose 1.x, DOCKER_BUILDKIT=0) reads only the context's .dockerignore.
    root = (ROOT / ".dockerignore").read_text()
    for name in ("api.Dockerfile.dockerignore", "worker.Dockerfile.dockerignore"):
        assert (DOCKER / name).read_text() == root, name
    for path in ("pyproject.toml", "README.md", "consa/", "service/", "worker/", "docker/wheels/", "docker/local/"):
        assert f"!{path}" in root.splitlines(), path


def test_api_healthcheck_is_liveness_not_readiness(compose):
    test = " ".join(compose["services"]["api"]["healthcheck"]["test"])
    assert "/healthz" in test and "/readyz" not in test
    assert "/healthz" in dockerfile("api.Dockerfile").split("HEALTHCHECK", 1)[1]


def test_workers_have_fixed_distinct_hostnames_an_init_and_a_warm_stop(compose, local_stack):
    # A restarted worker finds the job its previous process left by its name (celery@HOSTNAME).
    for stack in (compose, local_stack):
        workers = {n: s for n, s in stack["services"].items() if n.startswith("worker")}
        names = [s["hostname"] for s in workers.values()]
        assert len(names) == len(set(names)) == len(workers)
        for name, spec in workers.items():
            assert spec["init"] is True and spec.get("stop_signal", "SIGTERM") == "SIGTERM", name
            assert spec["stop_grace_period"] and spec["shm_size"], name


def test_local_stack_needs_no_gpu_and_no_docker_hub(local_stack):
    jsonschema.Draft201909Validator(SCHEMA).validate(local_stack)
    services = local_stack["services"]
    active = {n: s for n, s in services.items() if "gpu" not in s.get("profiles", [])}
    assert set(active) == {"api", "migrate", "worker-cpu", "redis", "postgres"}
    assert services["worker-gpu0"]["profiles"] == ["gpu"]
    for name, spec in active.items():
        assert "deploy" not in spec, f"{name} reserves a device"
        # Every image is built here, on the local base: nothing to pull.
        assert "build" in spec and spec["image"].startswith(("consa-", "consa-local/")), name
        assert spec["build"]["args"]["BASE"] == "${LOCAL_BASE:-consa-local/debian:bookworm}", name
        assert (DOCKER / spec["build"]["context"] / spec["build"]["dockerfile"]).is_file(), name
    assert services["worker-cpu"]["build"]["args"]["VARIANT"] == "cpu"
    # The CPU worker is the GPU worker's twin: same command, settings, volumes and start order.
    gpu, cpu = services["worker-gpu0"], services["worker-cpu"]
    assert cpu["command"] == gpu["command"] and cpu["volumes"] == gpu["volumes"]
    assert cpu["depends_on"] == gpu["depends_on"]
    assert {k: v for k, v in cpu["environment"].items() if not k.startswith("CONSA_CHECKPOINT")} == gpu["environment"]
    # The stand-ins take the official images' settings and healthchecks unchanged.
    assert services["postgres"]["environment"]["POSTGRES_DB"] == "consa"
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


def test_smoke_script_parses_and_ends_what_it_starts():
    script = (DOCKER / "smoke.sh").read_text()
    subprocess.run(["bash", "-n", str(DOCKER / "smoke.sh")], check=True)
    assert "trap teardown EXIT" in script and "down -v --remove-orphans" in script
    assert "exec -T api consa keys create" in script and "sha256sum" in script
    for check in ("restart", "docker kill", "stop worker-cpu", "stop api"):
        assert check in script, check


def test_image_commands_exist_in_the_package(compose):
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    service_deps = " ".join(pyproject["project"]["optional-dependencies"]["api"])
    for where, argv in image_commands(compose).items():
        program = argv[0]
        assert re.search(rf"\b{program}\b", service_deps), f"{where}: {program} is not installed by .[api] (in .[service] too)"
        if program == "uvicorn":
            target = next(a for a in argv[1:] if ":" in a and not a.startswith("-"))
            module, attr = target.split(":")
            factory = getattr(importlib.import_module(module), attr)
            assert "--factory" in argv and callable(factory), where
        elif program == "celery":
            from celery import Celery

            from service.settings import Settings

            module, attr = argv[argv.index("-A") + 1].split(":")
            app = getattr(importlib.import_module(module), attr)
            assert isinstance(app, Celery), where
            assert argv[argv.index("-A") + 2] == "worker" and argv[argv.index("--queues") + 1] == Settings().queue, where
            for included in app.conf.include:  # the task modules the worker imports at start
                assert importlib.util.find_spec(included), f"{where}: task module {included} is missing"
        elif program == "alembic":
            ini = argv[argv.index("-c") + 1]
            assert ini.startswith("/app/"), "the images install the repository at /app"
            assert (ROOT / ini.removeprefix("/app/")).is_file(), where
        else:
            pytest.fail(f"{where}: no check for {program}")


def test_migrate_command_really_migrates(compose, tmp_path):
    """Run the migrate service's command, as the container would (cwd /app = the repository)."""
    argv = [a.replace("/app/", str(ROOT) + "/") for a in compose["services"]["migrate"]["command"]]
    db = tmp_path / "consa.db"
    env = os.environ | {"CONSA_DATABASE_URL": f"sqlite:///{db}", "CONSA_VAR_DIR": str(tmp_path)}
    alembic = Path(sys.executable).with_name("alembic")
    subprocess.run([str(alembic) if alembic.exists() else argv[0], *argv[1:]], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=120)
    import sqlite3

    tables = {r[0] for r in sqlite3.connect(db).execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"jobs", "api_keys", "job_events", "artifacts", "alembic_version"} <= tables


def test_healthcheck_commands_are_valid(compose, tmp_path):
    api_test = compose["services"]["api"]["healthcheck"]["test"]
    assert api_test[:3] == ["CMD", "python", "-c"]
    compile(api_test[3], "healthcheck", "exec")
    from service.main import create_app
    from service.settings import Settings

    paths = create_app(Settings(var_dir=tmp_path)).openapi()["paths"]
    assert re.search(r"127\.0\.0\.1:8000(/\w+)", api_test[3]).group(1) in paths


def test_documented_consa_commands_parse():
    """Every `consa ...` line in docs/DEPLOY.md and the compose file's header parses with the real CLI."""
    from consa.cli.commands import build_parser

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["consa"] == "consa.cli:main"
    text = (ROOT / "docs" / "DEPLOY.md").read_text() + (DOCKER / "compose.yaml").read_text()
    # Indented code lines of the doc, and the compose header's "#   docker compose ... exec api consa ...".
    lines = re.findall(r"^(?:    |#   )(?:docker compose .*? exec api )?consa (\S.*)$", text, re.M)
    assert len(lines) >= 8, lines
    for line in lines:
        line = re.sub(r"\s+#.*$", "", re.sub(r"\[[^\]]*\]", "", line))  # optional parts, comments
        build_parser().parse_args(shlex.split(line.replace("JOB", "job_x")))


# -- the real thing, where a Docker engine runs ------------------------------------------------------------
def _docker_engine() -> str | None:
    """Why the smoke test cannot run here, or None when it can."""
    if shutil.which("docker") is None:
        return "no docker client on PATH (install Docker: `apt-get install docker.io`, then start dockerd)"
    try:
        info = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True,
                              timeout=20)
    except subprocess.TimeoutExpired:
        return "the Docker engine did not answer within 20 s"
    if info.returncode != 0 or not info.stdout.strip():
        return "no Docker engine answers (`docker info` fails): start dockerd to run docker/smoke.sh"
    compose_v2 = subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
    if not (compose_v2 or shutil.which("docker-compose") or shutil.which("podman-compose")):
        return "no Compose implementation (the compose plugin, Debian's docker-compose, or podman-compose)"
    return None


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("store", ["local", "s3"])
def test_smoke_stack_end_to_end(tmp_path, request, store):
    markexpr = request.config.getoption("markexpr") or ""
    asked = os.environ.get("CONSA_DOCKER_SMOKE") == "1" or (re.search(r"\bdocker\b", markexpr)
                                                              and not re.search(r"\bnot\s+docker\b", markexpr))
    if not asked:
        pytest.skip("the Docker smoke test builds and runs the whole stack (~10 min): run it with "
                    "`python3 -m pytest -m docker tests/test_docker.py` (or CONSA_DOCKER_SMOKE=1)")
    reason = _docker_engine()
    if reason:
        pytest.skip(reason)
    # A project name of its own, so a smoke run someone started by hand is left alone.
    env = os.environ | {"SMOKE_PROJECT": f"consa-pytest-{os.getpid()}"}
    run = subprocess.run(["bash", str(DOCKER / "smoke.sh")] + (["--s3"] if store == "s3" else []), cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=3500)
    (tmp_path / "smoke.log").write_text(run.stderr)
    assert run.returncode == 0, run.stderr[-6000:]
    timings = dict(line.split()[1:3] for line in run.stdout.splitlines() if line.startswith("TIMING "))
    assert {"build", "up_to_api_healthy", "job_wall", "kill_to_resumed", "worker_stop"} <= set(timings)
    assert float(timings["worker_stop"]) < 60  # handed back after a step, not the 2-minute grace period
    resumed = {k: int(v) for k, v in (line.split()[:2] for line in run.stdout.splitlines() if line.startswith("RESUMED_"))}
    assert resumed["RESUMED_AFTER_KILL"] > 0 and resumed["RESUMED_AFTER_STOP"] > 0
    sizes = {line.split()[1]: int(line.split()[2]) for line in run.stdout.splitlines() if line.startswith("SIZE ")}
    assert sizes["consa-api:latest"] <= 1.2e9
    if store == "s3":  # the API and the worker shared no folder; the job's files came from the bucket
        marks = {line.split()[0]: line.split()[1:] for line in run.stdout.splitlines()}
        assert int(marks["S3_OBJECTS"][0]) > 0 and int(marks["RANGE_RESUMED"][1]) > 0
        assert "WORKER_REPLACED" in marks  # the kill's resume came from the bucket, to a new container and volume
        assert int(marks["S3_DELETED"][0]) > 0  # a deleted job's objects left the bucket
