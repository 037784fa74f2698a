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
    from review_lm.testing.tiny_model import load_qwen_tokenizer

    return load_qwen_tokenizer()


@pytest.fixture(scope="session")
def bpe_tokenizer(example_data_file):
    """Tiny byte-level BPE trained on the example file (make_tiny_model's default vocab size); eos == pad."""
    from review_lm.testing.tiny_model import train_bpe_tokenizer

    return train_bpe_tokenizer([str(example_data_file)], 2000)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    """A tiny random Qwen2 with a 1000-token byte-level BPE trained on the example file (one per test module)."""
    from review_lm.testing.tiny_model import make_tiny_model

    return make_tiny_model(str(tmp_path_factory.mktemp("tiny")), tokenizer_kind="bpe",
                           corpus=[str(REPO_ROOT / "example_movie_review_data.json")], vocab_size=1000,
                           hidden_size=64, num_layers=2)


# The example file as the data loader's tests read it (test_data_loader, test_prompts, test_token_budget).
@pytest.fixture
def example_records(example_data_file) -> list:
    import json

    from tests.helpers import records_of

    with open(example_data_file, encoding="utf-8") as f:
        obj = json.load(f)
    return records_of(obj[0])


@pytest.fixture
def example_data(example_data_file):
    import data_loader_movie_review as dl

    return dl.load_review_file(str(example_data_file))


@pytest.fixture
def example_splits(example_data) -> dict:
    import data_loader_movie_review as dl

    return dl.split_chronologically(example_data)


# Tokenizers and real conversations for the chat layout's tests (test_chat_format, test_chat_windows).
@pytest.fixture(scope="module")
def qwen25_tokenizer(qwen_tokenizer):
    """The real Qwen vocabulary with Qwen2.5's chat template (a copy)."""
    import copy

    from tests.helpers import QWEN25_TEMPLATE

    tok = copy.deepcopy(qwen_tokenizer)
    tok.chat_template = QWEN25_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def bpe_chatml(bpe_tokenizer):
    """The tiny BPE (no template) with <|im_start|> / <|im_end|> added as special tokens (a copy)."""
    import copy

    from review_lm.data import chat_layout as cf

    tok = copy.deepcopy(bpe_tokenizer)
    assert cf.add_chatml_tokens(tok) == 2
    assert cf.add_chatml_tokens(tok) == 0
    return tok


@pytest.fixture(scope="module")
def formats(qwen_tokenizer, qwen25_tokenizer, bpe_tokenizer, bpe_chatml):
    """Every layout under test, by name."""
    from review_lm.data import chat_layout as cf

    return {
        "qwen3-template": cf.ChatFormat(qwen_tokenizer, "auto"),
        "qwen25-template": cf.ChatFormat(qwen25_tokenizer, "auto"),
        "qwen-builtin": cf.ChatFormat(qwen_tokenizer, "none"),
        "bpe-builtin-eos": cf.ChatFormat(bpe_tokenizer, "auto"),  # no template, no ChatML tokens
        "bpe-builtin-chatml": cf.ChatFormat(bpe_chatml, "auto"),
    }


@pytest.fixture(scope="module")
def real_data(douban_dmr_dir):
    import data_loader_movie_review as dl

    return dl.load_review_data([str(douban_dmr_dir)])


@pytest.fixture(scope="module")
def real_users(real_data):
    return real_data.users


@pytest.fixture(scope="module")
def example_user(example_data_file):
    import data_loader_movie_review as dl

    return dl.load_review_file(str(example_data_file)).users[0]


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


@pytest.fixture
def dmsc_file(tmp_path) -> Path:
    """A DMSC.csv in the Douban layout with every kind of messy row (tests/douban_layouts.py)."""
    from tests.douban_layouts import DMSC_HEADER, dmsc_rows, write_csv

    path = write_csv(tmp_path / "DMSC.csv", DMSC_HEADER, dmsc_rows())
    with open(path, "ab") as f:  # a broken row: three fields where the header has ten
        f.write("99,Broken,坏行\r\n".encode())
    return path


@pytest.fixture(scope="module")
def preview_run(tmp_path_factory, tiny_model) -> Path:
    """A run folder from --preview_only (test_samples.json and test_histories.json, with the run digest)."""
    import train_distributed_MovieReview as tr
    from tests.helpers import EXAMPLE

    out = tmp_path_factory.mktemp("preview") / "run"
    assert tr.main(["--data_file", EXAMPLE, "--output_dir", str(out), "--model_path", tiny_model, "--report_to",
                    "none", "--preview_only"]) == 0
    return out
