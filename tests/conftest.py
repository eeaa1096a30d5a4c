import sys
from pathlib import Path

import pytest

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
