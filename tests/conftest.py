"""Shared fixtures. Tokenizers are session-scoped: loading the real Qwen vocabulary takes a few seconds."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # tests run from the repo root, but be explicit for `tools` and the module
    sys.path.insert(0, str(REPO_ROOT))

# Real Douban histories live next to the repository (../shared/data/douban_dmr relative to the repo root).
# DOUBAN_DMR_DIR overrides it (a worktree in another folder reads the same files from where they are).
DOUBAN_DMR_DIR = Path(os.environ.get("DOUBAN_DMR_DIR")
                      or (REPO_ROOT / ".." / "shared" / "data" / "douban_dmr")).resolve()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def example_data_file() -> Path:
    """The spec's example file: 28 reviews of user "Y"."""
    path = REPO_ROOT / "example_movie_review_data.json"
    if not path.is_file():
        pytest.fail(f"{path} is missing")
    return path


@pytest.fixture(scope="session")
def douban_dmr_dir() -> Path:
    """Folder of real review files; tests that need it are skipped only when the folder is absent."""
    if not DOUBAN_DMR_DIR.is_dir():
        pytest.skip(f"real data folder {DOUBAN_DMR_DIR} is absent")
    return DOUBAN_DMR_DIR


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """The real Qwen BPE vocabulary (offline), eos == pad == <|endoftext|> like Qwen2.5 base."""
    from review_lm.tiny_model import load_qwen_tokenizer

    return load_qwen_tokenizer()


@pytest.fixture(scope="session")
def bpe_tokenizer(example_data_file):
    """Tiny byte-level BPE trained on the example file (make_tiny_model's default vocab size); eos == pad."""
    from review_lm.tiny_model import train_bpe_tokenizer

    return train_bpe_tokenizer([str(example_data_file)], 2000)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    """A tiny random Qwen2 with a 1000-token byte-level BPE trained on the example file (one per test module)."""
    from review_lm.tiny_model import make_tiny_model

    return make_tiny_model(str(tmp_path_factory.mktemp("tiny")), tokenizer_kind="bpe",
                           corpus=[str(REPO_ROOT / "example_movie_review_data.json")], vocab_size=1000,
                           hidden_size=64, num_layers=2)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: skipped (with the reason) on machines without it, such as CI."""
    import importlib.util

    if importlib.util.find_spec("torch") is not None:
        import torch

        if torch.cuda.is_available():
            return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on a GPU machine: python -m pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
