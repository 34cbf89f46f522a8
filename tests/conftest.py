from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from factories import tiny_gemma2, tiny_llama  # noqa: E402

from patchscope import load_model  # noqa: E402

torch.manual_seed(0)


@pytest.fixture(scope="session")
def gemma_dir(tmp_path_factory) -> Path:
    return tiny_gemma2(tmp_path_factory.mktemp("tiny-gemma2"))


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def gemma(gemma_dir):
    """(model, tokenizer) loaded through patchscope.load_model, fp32 on CPU."""
    return load_model(str(gemma_dir), dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def llama(llama_dir):
    return load_model(str(llama_dir), dtype="float32", device="cpu")


@pytest.fixture(params=["gemma", "llama"])
def any_model(request):
    return request.getfixturevalue(request.param)
