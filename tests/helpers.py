"""Version-aware builders so one test body runs on every TRL in the matrix (0.11 to 1.x)."""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import subprocess
import sys
from contextlib import contextmanager

import pytest
import trl
from packaging.version import Version

TRL = Version(Version(trl.__version__).base_version)


def config_fields(cls) -> set:
    return {f.name for f in dataclasses.fields(cls)}


def sft_config(tmp_path, **overrides):
    """An SFTConfig for a few CPU steps, spelled the way the installed TRL wants it."""
    from trl import SFTConfig

    fields = config_fields(SFTConfig)
    values = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=5, logging_steps=1,
        report_to="none", save_strategy="no", learning_rate=1e-3, seed=0, dataloader_num_workers=0,
        disable_tqdm=True,
    )
    if os.environ.get("TESTS_ON_GPU") != "1":  # TESTS_ON_GPU=1: the same tests on a GPU machine's CUDA path
        values["use_cpu" if "use_cpu" in fields else "no_cuda"] = True
    if "max_length" in overrides and "max_length" not in fields:
        overrides["max_seq_length"] = overrides.pop("max_length")
    if "dataset_text_field" in fields and "dataset_text_field" not in overrides:
        values["dataset_text_field"] = "text"
    values.update(overrides)
    return SFTConfig(**values)


def sft_trainer(model, tokenizer, dataset, config, **kwargs):
    from trl import SFTTrainer

    parameters = inspect.signature(inspect.unwrap(SFTTrainer.__init__)).parameters
    key = "processing_class" if "processing_class" in parameters else "tokenizer"
    return SFTTrainer(model=model, args=config, train_dataset=dataset, **{key: tokenizer}, **kwargs)


def text_dataset(tokenizer, limit=32):
    from unsloth_patch.tiny import chat_dataset

    return chat_dataset(tokenizer, limit=limit, format="text")


def losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@contextmanager
def plugin_log(caplog, level=logging.INFO):
    """Let pytest capture the plugin's logger (it has its own handler and does not propagate)."""
    logger = logging.getLogger("unsloth_patch")
    old_level = logger.level
    logger.setLevel(level)
    caplog.handler.setLevel(level)
    logger.addHandler(caplog.handler)
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)
        logger.setLevel(old_level)


def run_python(code: str, env_extra=None, timeout=240):
    """Run ``code`` in a fresh interpreter (import-time behaviour needs a clean process)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNSLOTH_PATCH_")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout)


def needs_trl(minimum: str, reason: str):
    return pytest.mark.skipif(TRL < Version(minimum), reason=f"TRL {TRL} has no {reason} (since {minimum})")


def train_collator(trainer):
    """The collator the trainer's training dataloader uses."""
    from unsloth_patch.patches.training_edits import train_collator as lookup

    return lookup(trainer)


def during_training(trainer):
    """The model as ``train()`` runs it: the plan's edits applied for the block, rolled back after."""
    from unsloth_patch.patches.training_edits import active

    return active(trainer)


@pytest.fixture
def use_settings(monkeypatch):
    """Set toggles for one test: ``use_settings(padding_free="on")``."""
    import dataclasses

    from unsloth_patch import settings as settings_module

    def set_(**values):
        monkeypatch.setattr(settings_module, "_current", dataclasses.replace(settings_module.current(), **values))

    return set_


@pytest.fixture
def fusion_on_this_cpu(monkeypatch):
    """Let the fused forwards be installed and entered on the CPU (a test injects their kernels)."""
    from unsloth_patch import layers

    monkeypatch.setattr(layers, "_triton_available", lambda: True)
    monkeypatch.setattr(layers, "_model_reason", lambda model: None)
    monkeypatch.setattr(layers, "_runs_here", lambda tensor: True)


@pytest.fixture(autouse=True)
def fresh_fallbacks():
    """Autouse wherever imported: no kernel's earlier fallback or the plugin's earlier log lines carry over."""
    from unsloth_patch import fallback
    from unsloth_patch import log as plugin_log_module

    fallback.reset()
    plugin_log_module.forget()
    yield
    fallback.reset()
