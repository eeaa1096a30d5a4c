"""consa is a library first: it imports and runs without the service packages installed."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

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
    # Every module of the library, found on disk (a new one is covered without editing this test);
    # __main__ runs the CLI on import, and remote_modeling is the file a checkpoint ships, never imported.
    modules = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                     for p in (ROOT / "consa").rglob("*.py") if p.stem not in ("__main__", "remote_modeling"))
    assert {"consa.core.config", "consa.recipe.pipeline", "consa.search.loop", "consa.runtime.cache",
            "consa.core.units", "consa.search.objectives"} <= set(modules)
    proc = _run("import importlib\n" + "\n".join(f"importlib.import_module('{m}')" for m in modules)
                + "\nimport consa; print(consa.__version__)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == __import__("consa").__version__


def test_cli_runs_and_serve_says_what_is_missing():
    proc = _run("import sys; from consa.cli import main; sys.argv=['consa', '--help']; main()")
    assert "search" in proc.stdout and "export" in proc.stdout
    proc = _run("import sys; from consa.cli import main; sys.exit(main(['serve']))")
    assert proc.returncode == 2
    assert "the service is not installed" in proc.stderr and "consa[service]" in proc.stderr


# -- the direction of imports: worker -> service -> consa, never back --------------------------
def _imports(path: Path) -> list[str]:
    """Every module a file imports: import statements (anywhere, lazy ones too) and
    importlib.import_module("...") / __import__("...") calls with a literal name."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) \
                and (getattr(node.func, "attr", None) == "import_module" or getattr(node.func, "id", None) == "__import__"):
            names.append(node.args[0].value)
    return names


def _violations(package: str, forbidden: set[str]) -> list[str]:
    return [f"{path.relative_to(ROOT)} imports {name}" for path in sorted((ROOT / package).rglob("*.py"))
            for name in _imports(path) if name.split(".")[0] in forbidden]


def test_the_library_never_imports_the_service_or_the_worker():
    assert _violations("consa", {"service", "worker"}) == []


def test_the_service_never_imports_the_worker():
    assert _violations("service", {"worker"}) == []


def test_the_import_check_sees_lazy_imports(tmp_path, monkeypatch):
    # The checks above would pass vacuously if the walker missed imports inside functions.
    bad = tmp_path / "consa"
    bad.mkdir()
    (bad / "x.py").write_text("def f():\n    from service.serve import serve\n    import importlib\n"
                              "    importlib.import_module('worker.tasks')\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert _violations("consa", {"service", "worker"}) == ["consa/x.py imports service.serve",
                                                            "consa/x.py imports worker.tasks"]
