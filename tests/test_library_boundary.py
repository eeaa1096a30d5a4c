"""consa is a library first: it imports and runs without the service packages installed."""

import subprocess
import sys

SERVICE_PACKAGES = ["fastapi", "starlette", "uvicorn", "celery", "kombu", "redis", "sqlalchemy", "alembic",
                    "psycopg", "pydantic_settings", "prometheus_client", "httpx", "service", "worker"]

# A finder that refuses the service packages, as if they were not installed.
BLOCKER = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {SERVICE_PACKAGES!r}:
            raise ModuleNotFoundError(f"blocked: {{name}}", name=name)
sys.meta_path.insert(0, Block())
"""


def _run(code: str):
    return subprocess.run([sys.executable, "-c", BLOCKER + code], capture_output=True, text=True, timeout=120)


def test_every_library_module_imports_without_the_service():
    modules = ["gates", "constraint", "hybrid_attention", "data", "search", "baselines", "evaluation", "compare",
               "heatmap", "manifest", "export", "runtime", "client", "jobs_cli", "cli", "errors"]
    proc = _run("import importlib\n" + "\n".join(f"importlib.import_module('consa.{m}')" for m in modules)
                + "\nimport consa; print(consa.__version__)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == __import__("consa").__version__


def test_cli_runs_and_serve_says_what_is_missing():
    proc = _run("import sys; from consa.cli import main; sys.argv=['consa', '--help']; main()")
    assert "search" in proc.stdout and "export" in proc.stdout
    proc = _run("import sys; from consa.cli import main; sys.exit(main(['serve']))")
    assert proc.returncode == 2
    assert "the service is not installed" in proc.stderr and "consa[service]" in proc.stderr
