"""consa: learn which attention units of a pretrained LLM can use sliding-window attention.

The core needs torch, transformers and safetensors only; the service lives in other packages.
"""

__version__ = "0.1.0"

from consa.config import SearchConfig  # noqa: E402
from consa.manifest import Allocation, load_allocation  # noqa: E402

__all__ = ["Allocation", "SearchConfig", "load_allocation", "__version__", "load_hybrid"]


def load_hybrid(path, **kwargs):
    """Load a hybrid checkpoint written by `consa export` (both granularities)."""
    from consa.export import load_hybrid as _load_hybrid

    return _load_hybrid(path, **kwargs)
