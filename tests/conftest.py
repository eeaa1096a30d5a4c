import os
import sys
from pathlib import Path

import pytest

# Without a GPU, consa's Triton decode kernel runs in Triton's CPU interpreter (read when kernels are
# defined, so before consa.runtime.decode_kernel is imported).
os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))
import tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny random Qwen3 (4 layers x 2 KV heads) with a byte-level BPE tokenizer."""
    return tiny.save_tiny(tmp_path_factory.mktemp("models") / "tiny-qwen3")


@pytest.fixture(scope="session")
def text_dir(tmp_path_factory):
    """A directory of real Python source to pack into training sequences."""
    return tiny.write_text_dir(tmp_path_factory.mktemp("data") / "text")


@pytest.fixture(scope="session")
def tokenizer():
    return tiny.build_tokenizer()


@pytest.fixture(scope="session")
def bench_script():
    """Import a script of bench/ (a folder of scripts, not a package) by name: bench_script("quality")."""
    import importlib.util

    loaded = {}

    def load(name: str):
        if name not in loaded:
            path = Path(__file__).parents[1] / "bench" / f"{name}.py"
            spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
            loaded[name] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(loaded[name])
        return loaded[name]

    return load


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on one intra-op thread for a module: on a busy 2-core machine a second thread makes each
    op of a tiny matrix wait on the other, up to ~100x longer."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
