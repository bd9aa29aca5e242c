"""Shared fixtures: tiny offline models and tokenizers, seeded. No downloads, no ../shared needed."""

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu are skipped where PyTorch sees no CUDA device (run them with `make test-gpu`)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_cfg():
    from pocket_teacher.config import get_preset

    return get_preset("tiny")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_cfg):
    from pocket_teacher.models import build_tiny_tokenizer

    return build_tiny_tokenizer(tiny_cfg.teacher.tiny.vocab_size)


@pytest.fixture()
def tiny_teacher(tiny_cfg, tiny_tokenizer):
    from pocket_teacher.models import build_tiny_model, freeze

    return freeze(build_tiny_model(tiny_cfg.teacher.tiny, len(tiny_tokenizer)))


@pytest.fixture(scope="session")
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present on this machine")
    return SHARED_DATA
