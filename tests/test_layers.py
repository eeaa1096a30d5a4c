"""The library's layers: the order below is the source of truth (docs/ARCHITECTURE.md explains it).

A module may import modules of its own layer or of the layers before it, never of a later one, and
no chain of imports may come back to where it started (lazy imports inside functions count too).
Between the top folders: worker -> service -> consa (tests/test_library_boundary.py).
"""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# consa/<layer>/, bottom first. `consa/__init__.py` and `consa/__main__.py` (the public names and
# `python -m consa`) sit above every layer.
LAYERS = [
    "core",        # settings (SearchConfig), the manifest (Allocation), units, data, artifacts, errors
    "model",       # a transformers model under an allocation: hybrid attention, loading, devices, sharding
    "runtime",     # running a hybrid: the KV cache, its kernels and its byte accounting
    "evaluation",  # loss / retrieval / KV of allocations, the baselines, comparisons, heatmaps
    "search",      # the learned allocation: gates, constraint, objectives, memory plan, the loop, data parallel
    "export",      # checkpoints and formats (HF, consa, DuoAttention), fine-tuning
    "recipe",      # run_allocation: search -> manifest -> heatmap -> evaluation -> checkpoint
    "cli",         # the `consa` command line and the HTTP client of a server
]
FACADE = {"consa", "consa.__main__"}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def library_modules(root: Path) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted((root / "consa").rglob("*.py"))}


def imports_of(path: Path, modules: dict) -> set[str]:
    """The consa modules a file imports, lazy ones included; `from pkg import mod` counts as mod."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import (write consa.<layer>.<module>)"
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in modules else node.module)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) \
                and (getattr(node.func, "attr", None) == "import_module" or getattr(node.func, "id", None) == "__import__"):
            found.add(node.args[0].value)
    return {m for m in found if m in modules}


def layer_of(module: str) -> int:
    if module in FACADE:
        return len(LAYERS)
    name = module.split(".")[1]
    assert name in LAYERS, f"{module}: consa/{name}/ is no layer of LAYERS"
    return LAYERS.index(name)


def graph(root: Path) -> dict[str, set[str]]:
    modules = library_modules(root)
    return {m: imports_of(p, modules) - {m} for m, p in modules.items()}


def arrows_back_up(edges: dict) -> list[str]:
    return sorted(f"{a} -> {b}" for a, targets in edges.items() for b in targets if layer_of(b) > layer_of(a))


def circles(edges: dict) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_every_module_lives_in_a_layer():
    for module in library_modules(ROOT):
        assert module in FACADE or len(module.split(".")) >= 2 and module.split(".")[1] in LAYERS, module
    assert {p.name for p in (ROOT / "consa").iterdir() if p.is_dir() and p.name != "__pycache__"} == set(LAYERS)


def test_no_import_runs_back_up_a_layer():
    assert arrows_back_up(graph(ROOT)) == []


def test_no_import_circle():
    assert circles(graph(ROOT)) == []


def test_the_checks_see_lazy_imports_arrows_up_and_circles(tmp_path):
    # The checks above would pass vacuously if the walker missed an import.
    for rel, text in {"consa/__init__.py": "", "consa/core/__init__.py": "", "consa/search/__init__.py": "",
                      "consa/core/a.py": "def f():\n    from consa.search import b\n",
                      "consa/search/b.py": "import consa.search.c\n",
                      "consa/search/c.py": "def g():\n    from consa.search.b import x\n"}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    edges = graph(tmp_path)
    assert arrows_back_up(edges) == ["consa.core.a -> consa.search.b"]
    assert circles(edges) == [["consa.search.b", "consa.search.c"]]


def _loaded_after(code: str) -> set:
    proc = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sorted(sys.modules)))"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return set(proc.stdout.split())


def test_the_api_process_imports_no_torch(tmp_path):
    # The app as uvicorn builds it, with its schema (the search settings' choice lists) rendered.
    loaded = _loaded_after(f"import os; os.environ['CONSA_VAR_DIR'] = {str(tmp_path)!r}\n"
                           "from service.main import create_app\napp = create_app(); app.openapi()")
    assert {"fastapi", "consa.core.config"} <= loaded
    assert not loaded & {"torch", "transformers", "safetensors"}


def test_the_cli_and_its_http_commands_import_no_torch():
    loaded = _loaded_after("from consa.cli import commands, jobs\ncommands.build_parser()")
    assert "consa.cli.client" in loaded and not loaded & {"torch", "transformers"}


def test_the_public_names_resolve_where_users_import_them():
    import consa

    for name in consa.__all__:
        assert getattr(consa, name) is not None, name
    assert consa.load_hybrid.__module__ == "consa.export.checkpoint"
