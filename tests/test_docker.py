"""docker/: no Docker engine runs here, so the compose file is checked against the compose-spec JSON
schema plus the rules this deployment relies on, and every command the images run is checked
against the package (the module, attribute or file it names exists; the migration really runs)."""

import importlib
import importlib.util
import json
import os
import re
import shlex
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


def test_api_image_has_no_cuda_and_worker_image_has_cuda():
    api_base = instructions("api.Dockerfile", "FROM")[0]
    assert "slim" in api_base and "cuda" not in api_base
    assert "download.pytorch.org/whl/cpu" in dockerfile("api.Dockerfile")  # the CPU torch wheel
    worker = dockerfile("worker.Dockerfile")
    base = re.search(r"ARG BASE=(\S+)", worker).group(1)
    assert "cuda" in base
    assert re.search(r"ARG FLASH_ATTN=0", worker) and "flash-attn" in worker


def test_image_commands_exist_in_the_package(compose):
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    service_deps = " ".join(pyproject["project"]["optional-dependencies"]["service"])
    for where, argv in image_commands(compose).items():
        program = argv[0]
        assert re.search(rf"\b{program}\b", service_deps), f"{where}: {program} is not installed by .[service]"
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
    from consa.cli import build_parser

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["consa"] == "consa.cli:main"
    text = (ROOT / "docs" / "DEPLOY.md").read_text() + (DOCKER / "compose.yaml").read_text()
    # Indented code lines of the doc, and the compose header's "#   docker compose ... exec api consa ...".
    lines = re.findall(r"^(?:    |#   )(?:docker compose .*? exec api )?consa (\S.*)$", text, re.M)
    assert len(lines) >= 8, lines
    for line in lines:
        line = re.sub(r"\s+#.*$", "", re.sub(r"\[[^\]]*\]", "", line))  # optional parts, comments
        build_parser().parse_args(shlex.split(line.replace("JOB", "job_x")))
