"""consa: learn which attention units of a pretrained LLM can use sliding-window attention.

The core needs torch, transformers and safetensors only; the service lives in other packages.
The public names below load on first use, so `import consa` (and the CLI's HTTP commands, and the
API process through consa.core.config) costs no torch import.

    consa.SearchConfig, consa.run_allocation, consa.load_allocation, consa.Allocation, consa.load_hybrid
"""

from importlib import import_module

from consa.core.version import __version__

# public name -> the module that defines it (one place each)
_PUBLIC = {
    "SearchConfig": "consa.core.config",
    "Allocation": "consa.core.manifest",
    "load_allocation": "consa.core.manifest",
    "load_hybrid": "consa.export.checkpoint",
    "run_allocation": "consa.recipe.pipeline",
}

__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'consa' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
