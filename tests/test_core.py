"""The core contract: activation in any import order, the registry, containment, toggles, report."""

from __future__ import annotations

import logging
import textwrap

import pytest

import unsloth_patch
from unsloth_patch import registry
from unsloth_patch import settings as settings_module
from unsloth_patch.settings import TOGGLES, read_settings

from .helpers import (losses, plugin_log, run_python, sft_config, sft_trainer, text_dataset, train_collator,  # noqa: F401
                      use_settings)

TARGETS_CHECK = textwrap.dedent("""
    import importlib
    def resolve(target):
        module, _, path = target.partition(":")
        owner = importlib.import_module(module)
        parts = path.split(".")
        for p in parts[:-1]:
            owner = getattr(owner, p)
        return owner, parts[-1]
    def current(target):
        owner, name = resolve(target)
        return vars(owner).get(name)  # a class or a module: its own attribute, None where absent
    def ours(value):
        names = []
        while value is not None and getattr(value, "_self_unsloth_patch", None):
            names.append(value._self_unsloth_patch)
            value = getattr(value, "__wrapped__", None)
        return names
""")


@pytest.mark.smoke
def test_patched_when_imported_before_trl():
    result = run_python(TARGETS_CHECK + textwrap.dedent("""
        import unsloth_patch
        from unsloth_patch import registry
        from trl import SFTTrainer
        layers = ours(SFTTrainer.__dict__["__init__"])
        assert layers == ["compat_args", "trainer_plan"], layers
        unsloth_patch.apply(); unsloth_patch.apply(); import unsloth_patch  # idempotent
        assert ours(SFTTrainer.__dict__["__init__"]) == layers
        applied = {r.name for r in unsloth_patch.report() if r.applied}
        assert {"compat_args", "trainer_plan", "config_fields", "label_count"} <= applied, applied
        print("OK", sorted(applied))
    """))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout


@pytest.mark.smoke
def test_patched_when_imported_after_trl_and_remove_restores_identity():
    result = run_python(TARGETS_CHECK + textwrap.dedent("""
        from trl import SFTTrainer, SFTConfig
        import transformers.trainer, transformers.modeling_utils, transformers.training_args
        import trl.trainer.sft_config, trl.trainer.sft_trainer
        owners = [SFTTrainer, SFTConfig, transformers.trainer.Trainer, transformers.training_args.TrainingArguments,
                  trl.trainer.sft_trainer,  # the module: its add_fused_lm_head (TRL >= 1.15)
                  transformers.modeling_utils.PreTrainedModel]
        snapshot = {owner: dict(vars(owner)) for owner in owners}
        import unsloth_patch
        from unsloth_patch import registry
        targets = [t for p in registry.PATCHES if not p.install for t in p.targets]
        before = {t: snapshot[resolve(t)[0]].get(resolve(t)[1]) for t in targets}
        assert ours(SFTTrainer.__dict__["__init__"]) == ["compat_args", "trainer_plan"]
        changed = [t for t in targets if current(t) is not before[t]]
        assert changed, "nothing was patched"
        unsloth_patch.remove()
        assert all(current(t) is before[t] for t in targets), [t for t in targets if current(t) is not before[t]]
        import transformers.modeling_utils as mu
        interface = getattr(mu, "AttentionInterface", None)  # transformers >= 4.51
        assert interface is None or "unsloth_varlen" not in interface._global_mapping
        unsloth_patch.apply()
        assert ours(SFTTrainer.__dict__["__init__"]) == ["compat_args", "trainer_plan"]
        assert interface is None or "unsloth_varlen" in interface._global_mapping
        print("OK")
    """))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout


def test_disable_leaves_trl_untouched():
    result = run_python(TARGETS_CHECK + textwrap.dedent("""
        import unsloth_patch
        from trl import SFTTrainer
        assert ours(SFTTrainer.__dict__["__init__"]) == []
        unsloth_patch.apply()
        assert ours(SFTTrainer.__dict__["__init__"]) == []
        reasons = {r.reason for r in unsloth_patch.report()}
        assert reasons == {"plugin disabled by UNSLOTH_PATCH_DISABLE"}, reasons
        print("OK")
    """), env_extra={"UNSLOTH_PATCH_DISABLE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout


def test_import_is_cheap_and_imports_no_framework():
    result = run_python("import sys, unsloth_patch\n"
                        "heavy = {'torch', 'transformers', 'trl'} & set(sys.modules)\n"
                        "assert not heavy, heavy\nprint('OK')")
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-2000:]


def test_invalid_toggle_fails_the_import_clearly():
    result = run_python("import unsloth_patch", env_extra={"UNSLOTH_PATCH_PADDING_FREE": "maybe"})
    assert result.returncode != 0
    assert "ValueError" in result.stderr
    assert "UNSLOTH_PATCH_PADDING_FREE='maybe'" in result.stderr
    assert "auto, on, off" in result.stderr


@pytest.mark.smoke
def test_report_command_prints_versions_toggles_and_patches(capsys):
    import unsloth_patch.__main__ as cli

    assert cli.main([]) == 0
    out = capsys.readouterr().out
    for line in ("python ", "torch ", "transformers ", "trl ", "triton ", "gpu "):
        assert any(row.startswith(line) for row in out.splitlines()), line
    for toggle in TOGGLES:
        assert toggle.variable + "=" in out
    for patch in registry.PATCHES:
        assert patch.name in out
    applied = [row for row in out.splitlines() if " applied " in row]
    assert any("trainer_plan" in row for row in applied), out


def test_module_entry_point_runs():
    result = run_python("import runpy, sys; sys.argv = ['unsloth_patch', 'matrix']; "
                        "runpy.run_module('unsloth_patch', run_name='__main__')")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| TRL | transformers |" in result.stdout


# -- toggles -----------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, expected", [
    ("1", True), ("0", False), ("TRUE", True), ("false", False), ("Yes", True), ("no", False),
    ("ON", True), ("off", False),
])
def test_boolean_toggle_spellings(raw, expected):
    assert read_settings({"UNSLOTH_PATCH_DISABLE": raw}).disable is expected


@pytest.mark.parametrize("toggle", [t for t in TOGGLES])
def test_every_toggle_parses_and_rejects_garbage(toggle):
    good = {"DISABLE": "yes", "PADDING_FREE": "ON", "ATTENTION": "Triton", "PACKING": "On", "EMBEDDING_LR": "5e-5",
            "KERNELS": "off", "KERNELS_OFF": "rope, RMSNorm", "COMPAT": "off", "CHECKPOINTING": "off", "MEMORY_BUDGET_GB": "12", "DENSE_4BIT": "OFF",
            "MATMUL_4BIT": "Fused",
            "LOG_LEVEL": "DEBUG"}[toggle.name]
    parsed = getattr(read_settings({toggle.variable: good}), toggle.name.lower())
    assert parsed not in (None, toggle.default) or toggle.name == "DISABLE" and parsed is True
    assert getattr(read_settings({}), toggle.name.lower()) == toggle.default
    with pytest.raises(ValueError) as err:
        read_settings({toggle.variable: "not-a-valid-value"})
    message = str(err.value)
    assert toggle.variable in message and "not-a-valid-value" in message and "accepted" in message


@pytest.mark.parametrize("raw", ["0", "-1e-4", "nan", "inf", "fast"])
def test_embedding_lr_rejects_non_positive_and_nan(raw):
    with pytest.raises(ValueError, match="UNSLOTH_PATCH_EMBEDDING_LR"):
        read_settings({"UNSLOTH_PATCH_EMBEDDING_LR": raw})


@pytest.mark.parametrize("toggle", [t for t in TOGGLES])
@pytest.mark.parametrize("raw", ["", "  "])
def test_an_empty_value_is_an_error_naming_the_variable(toggle, raw):
    with pytest.raises(ValueError) as err:
        read_settings({toggle.variable: raw})
    assert toggle.variable in str(err.value) and "unset the variable" in str(err.value)


@pytest.mark.parametrize("name", ["EMBEDDING_LR", "MEMORY_BUDGET_GB"])
@pytest.mark.parametrize("raw", ["1_0", "1_000", "0x10", "1e", "--1"])
def test_numbers_are_written_plainly(name, raw):
    with pytest.raises(ValueError, match=f"UNSLOTH_PATCH_{name}"):
        read_settings({f"UNSLOTH_PATCH_{name}": raw})


def test_number_toggles_accept_plain_spellings_and_say_what_fits_them():
    assert read_settings({"UNSLOTH_PATCH_MEMORY_BUDGET_GB": "7.5"}).memory_budget_gb == 7.5
    assert read_settings({"UNSLOTH_PATCH_MEMORY_BUDGET_GB": " 24 "}).memory_budget_gb == 24.0
    assert read_settings({"UNSLOTH_PATCH_EMBEDDING_LR": "5E-6"}).embedding_lr == 5e-6
    with pytest.raises(ValueError) as budget:
        read_settings({"UNSLOTH_PATCH_MEMORY_BUDGET_GB": "lots"})
    with pytest.raises(ValueError) as rate:
        read_settings({"UNSLOTH_PATCH_EMBEDDING_LR": "lots"})
    assert "GiB" in str(budget.value) and "5e-5" not in str(budget.value)
    assert "5e-5" in str(rate.value) and "GiB" not in str(rate.value)


def test_unknown_prefixed_variable_is_reported_not_fatal():
    assert settings_module.unknown_variables({"UNSLOTH_PATCH_PADING_FREE": "on"}) == ["UNSLOTH_PATCH_PADING_FREE"]
    assert settings_module.unknown_variables({"UNSLOTH_PATCH_TORCH_SPEC": "torch"}) == []


# -- failure containment -------------------------------------------------------------------------

@pytest.fixture
def tiny(tmp_path):
    from unsloth_patch.tiny import build_model, build_tokenizer

    tokenizer = build_tokenizer()
    return tokenizer, lambda: build_model("llama", vocab_size=len(tokenizer), seed=0), text_dataset(tokenizer, 24)


def test_target_with_changed_signature_is_skipped_with_one_warning_and_training_runs(tiny, tmp_path, caplog,
                                                                                      use_settings):
    from trl.trainer import sft_trainer

    use_settings(padding_free="on")  # would flatten, were the patch applied

    tokenizer, make_model, dataset = tiny
    tokenizer_kwarg = _tokenizer_kwarg(tokenizer)
    unsloth_patch.remove()
    original = sft_trainer.SFTTrainer.__dict__["__init__"]

    def reshaped_init(self, model, config=None, train_dataset=None, **kwargs):  # "args" renamed upstream
        return original(self, model, args=config, train_dataset=train_dataset, **kwargs)

    sft_trainer.SFTTrainer.__init__ = reshaped_init
    try:
        from unsloth_patch import log as plugin_log_module

        plugin_log_module.forget()
        with plugin_log(caplog, logging.WARNING):
            unsloth_patch.apply()
            unsloth_patch.apply()
        records = {r.name: r for r in unsloth_patch.report()}
        assert not records["trainer_plan"].applied
        assert "changed shape" in records["trainer_plan"].reason and "args" in records["trainer_plan"].reason
        warnings = [r.getMessage() for r in caplog.records if "'trainer_plan'" in r.getMessage()]
        assert len(warnings) == 1, warnings
        assert sft_trainer.SFTTrainer.__dict__["__init__"] is reshaped_init  # untouched
        trainer = sft_trainer.SFTTrainer(make_model(), config=sft_config(tmp_path, max_steps=2),
                                         train_dataset=dataset, **tokenizer_kwarg)
        trainer.train()
        assert len(losses(trainer)) == 2
        assert type(train_collator(trainer)).__name__ != "PaddingFreeCollator"
    finally:
        unsloth_patch.remove()
        sft_trainer.SFTTrainer.__init__ = original
        unsloth_patch.apply()


def test_missing_target_is_skipped_and_padded_training_runs(tiny, tmp_path, caplog):
    import transformers.modeling_utils as modeling_utils

    if not hasattr(modeling_utils, "AttentionInterface"):
        pytest.skip("this transformers has no AttentionInterface to rename")
    tokenizer, make_model, dataset = tiny
    unsloth_patch.remove()
    interface = modeling_utils.AttentionInterface
    del modeling_utils.AttentionInterface  # "renamed" upstream
    modeling_utils.AttentionInterfaceRenamed = interface
    try:
        from unsloth_patch import log as plugin_log_module

        plugin_log_module.forget()
        with plugin_log(caplog, logging.WARNING):
            unsloth_patch.apply()
        record = {r.name: r for r in unsloth_patch.report()}["attention_interface"]
        assert not record.applied and "not found" in record.reason
        assert sum("attention_interface" in r.getMessage() for r in caplog.records) == 1
        trainer = sft_trainer(make_model(), tokenizer, dataset, sft_config(tmp_path, max_steps=2))
        assert "AttentionInterface" in unsloth_patch.last_plan().padding_free_reason
        trainer.train()
        assert len(losses(trainer)) == 2
        assert type(train_collator(trainer)).__name__ != "PaddingFreeCollator"
    finally:
        unsloth_patch.remove()
        modeling_utils.AttentionInterface = interface
        del modeling_utils.AttentionInterfaceRenamed
        unsloth_patch.apply()


def test_error_inside_our_logic_runs_stock_behaviour(tiny, tmp_path, caplog, monkeypatch):
    from unsloth_patch import log as plugin_log_module
    from unsloth_patch import plan

    tokenizer, make_model, dataset = tiny

    def broken(*args, **kwargs):
        raise RuntimeError("injected fault")

    monkeypatch.setattr(plan, "decide", broken)
    plugin_log_module.forget()
    with plugin_log(caplog, logging.WARNING):
        trainer = sft_trainer(make_model(), tokenizer, dataset, sft_config(tmp_path, max_steps=2))
        trainer = sft_trainer(make_model(), tokenizer, dataset, sft_config(tmp_path, max_steps=2))
    faults = [r for r in caplog.records if "injected fault" in r.getMessage()]
    assert len(faults) == 1  # logged once, not per call
    assert "rolled back" in unsloth_patch.last_plan().padding_free_reason
    trainer.train()
    assert len(losses(trainer)) == 2
    assert type(train_collator(trainer)).__name__ != "PaddingFreeCollator"


def test_error_before_the_call_runs_the_original_with_the_users_arguments(tiny, tmp_path, monkeypatch):
    from unsloth_patch.patches import sft_trainer_init

    tokenizer, make_model, dataset = tiny
    monkeypatch.setattr(sft_trainer_init, "_bind", lambda *a, **k: 1 / 0)
    config = sft_config(tmp_path, max_steps=1)
    trainer = sft_trainer(make_model(), tokenizer, dataset, config)
    assert trainer.args is config
    trainer.train()


def _tokenizer_kwarg(tokenizer):
    import inspect

    from trl import SFTTrainer

    names = inspect.signature(inspect.unwrap(SFTTrainer.__init__)).parameters
    return {"processing_class" if "processing_class" in names else "tokenizer": tokenizer}
