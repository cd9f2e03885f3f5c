"""Shared test setup: CPU-only runs execute Triton kernels in the interpreter; every test gets the
process environment back as it found it."""

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


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Undo the environment variables a test (its fixtures included) set, after it.

    transformers 4.x ``TrainingArguments.__post_init__`` writes ``ACCELERATE_MIXED_PRECISION`` into
    ``os.environ`` and takes it as the default of every later one: after a single bf16 config (TRL
    1.16's ``SFTConfig`` defaults to ``bf16=True``), every later trainer of the process, and every
    process it launches, trains under bf16 autocast even with ``bf16=False`` (transformers 5 no
    longer writes it). Without this, the fp32 comparisons of later tests compare bf16 runs: the
    first test of the session leaked it into ``tests/test_distributed.py``, whose DDP and
    single-process runs then differed by up to 1.1e-4 (stock DDP vs stock single process differs
    by 4.5e-5 under that autocast, by <= 7e-7 in fp32).
    """
    saved = dict(os.environ)
    try:
        return (yield)
    finally:
        for key in [k for k in os.environ if k not in saved]:
            del os.environ[key]
        for key, value in saved.items():
            if os.environ.get(key) != value:
                os.environ[key] = value


@pytest.fixture(scope="session")
def tokenizer():
    """The byte-level BPE of ``unsloth_patch.tiny``, built once for the whole session."""
    from unsloth_patch.tiny import build_tokenizer

    return build_tokenizer()
