"""Shared test setup: CPU-only runs execute Triton kernels in the interpreter."""

import os

try:
    import torch

    _cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _cuda = False

if not _cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    """The byte-level BPE of ``unsloth_patch.tiny``, built once for the whole session."""
    from unsloth_patch.tiny import build_tokenizer

    return build_tokenizer()
