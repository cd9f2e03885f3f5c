"""Argument compatibility: SFTTrainer scripts written for TRL 0.11 through 1.x run on the installed TRL."""

from __future__ import annotations

import dataclasses
import inspect
import logging

import pytest
from packaging.version import Version

import unsloth_patch
from unsloth_patch import log, registry
from unsloth_patch.patches.compat_args import (
    CompatConflictError,
    CompatUnplaceableError,
    Shape,
    translate_config_call,
    translate_trainer_call,
)
from unsloth_patch.patches.config_fields import explicit_fields

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
pytest.importorskip("datasets")

from transformers import TrainingArguments  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402
from .helpers import TRL  # noqa: E402

MAX_LEN = 48
DATASET_KWARGS = {"add_special_tokens": False}
LEARNING_RATE = 1e-4  # differs from both TrainingArguments' and SFTConfig's defaults


# --------------------------------------------------------------------------- fixtures


def _config_handler_registered() -> bool:
    return any(p.handler.endswith(":handle_sft_config_init") for p in registry.PATCHES)


@pytest.fixture(scope="module", autouse=True)
def patches_applied():
    """All patches applied; SFTConfig's compat handler included even before the registry lists it."""
    original = registry.PATCHES
    added = not _config_handler_registered()
    if added:
        entry = registry.Patch(
            name="compat_config",
            summary="Translate SFTConfig field names written for other TRL versions.",
            targets=("trl.trainer.sft_config:SFTConfig.__init__",),
            requires={"trl": ">=0.11"},
            toggle="COMPAT",
            active=lambda s: s.compat != "off",
            handler="unsloth_patch.patches.compat_args:handle_sft_config_init",
        )
        at = next(i for i, p in enumerate(original) if p.name == "config_fields")
        unsloth_patch.remove()
        registry.PATCHES = original[:at] + (entry,) + original[at:]
    unsloth_patch.apply()
    assert "compat_args" in registry.applied_names(), [r.as_dict() for r in unsloth_patch.report()]
    yield
    if added:
        unsloth_patch.remove()
        registry.PATCHES = original
        unsloth_patch.apply()


@pytest.fixture
def plugin_log(caplog):
    """Capture the plugin's warnings (its logger does not propagate by default)."""
    logger = logging.getLogger("unsloth_patch")
    propagate = logger.propagate
    logger.propagate = True
    log.forget()
    caplog.set_level(logging.WARNING, logger="unsloth_patch")
    try:
        yield caplog
    finally:
        logger.propagate = propagate
        log.forget()


def _tiny_parts():
    try:
        from unsloth_patch import tiny
    except ImportError:
        return _local_parts()
    tok = tiny.build_tokenizer()
    model = tiny.build_model(hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1, vocab_size=len(tok))
    data = tiny.chat_dataset(tok, limit=8, format="text")
    return tok, model, data


def _local_parts():
    """Fallback when unsloth_patch.tiny is unavailable: WordLevel tokenizer and a 2-layer Llama."""
    import torch
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    sentences = [f"the quick brown fox number {i} jumps over the lazy dog" for i in range(8)]
    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(sentences, trainers.WordLevelTrainer(special_tokens=["<pad>", "<s>", "</s>", "<unk>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", model_max_length=512)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=0,
                                         bos_token_id=1, eos_token_id=2))
    return tok, model, Dataset.from_list([{"text": s} for s in sentences])


@pytest.fixture(scope="module")
def parts():
    return _tiny_parts()


def _cpu() -> dict:
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return {"use_cpu": True} if "use_cpu" in names else {"no_cuda": True}


def _common(tmp_path) -> dict:
    return dict(output_dir=str(tmp_path), report_to="none", save_strategy="no", max_steps=2,
                per_device_train_batch_size=2, learning_rate=LEARNING_RATE, **_cpu())


def _config_fields() -> set:
    return {f.name for f in dataclasses.fields(SFTConfig) if f.init}


def _trainer_params() -> set:
    return set(inspect.signature(inspect.unwrap(vars(SFTTrainer)["__init__"])).parameters)


def _max_length_field() -> str:
    return "max_length" if "max_length" in _config_fields() else "max_seq_length"


# --------------------------------------------------------------------------- one script, four eras


def _style_trl_011(tmp_path, tok, model, data):
    return SFTTrainer(
        model=model,
        args=TrainingArguments(**_common(tmp_path)),
        train_dataset=data,
        tokenizer=tok,
        dataset_text_field="text",
        max_seq_length=MAX_LEN,
        packing=False,
        dataset_kwargs=dict(DATASET_KWARGS),
    )


def _style_trl_013(tmp_path, tok, model, data):
    config = SFTConfig(dataset_text_field="text", max_seq_length=MAX_LEN, packing=False,
                       dataset_kwargs=dict(DATASET_KWARGS), **_common(tmp_path))
    return SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tok)


def _style_trl_019(tmp_path, tok, model, data):
    config = SFTConfig(dataset_text_field="text", max_length=MAX_LEN, packing=False,
                       dataset_kwargs=dict(DATASET_KWARGS), **_common(tmp_path))
    return SFTTrainer(model, config, train_dataset=data, processing_class=tok)  # positional model/args


def _style_trl_1x(tmp_path, tok, model, data):
    config = SFTConfig(**_common(tmp_path), max_length=MAX_LEN, dataset_text_field="text",
                       dataset_kwargs=dict(DATASET_KWARGS))
    return SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tok)


STYLES = {
    "trl-0.11": _style_trl_011,
    "trl-0.13": _style_trl_013,
    "trl-0.19": _style_trl_019,
    "trl-1.x": _style_trl_1x,
}


@pytest.mark.parametrize("style", list(STYLES))
def test_script_written_for_each_trl_era_trains(style, parts, tmp_path):
    tok, model, data = parts
    trainer = STYLES[style](tmp_path, tok, model, data)
    args = trainer.args
    assert isinstance(args, SFTConfig)
    expected = {
        _max_length_field(): MAX_LEN,
        "dataset_text_field": "text",
        "packing": False,
        "dataset_kwargs": DATASET_KWARGS,
        "learning_rate": LEARNING_RATE,
        "max_steps": 2,
        "output_dir": str(tmp_path),
    }
    for name, value in expected.items():
        assert getattr(args, name) == value, (style, name, getattr(args, name), value)
    assert trainer.processing_class is tok if hasattr(trainer, "processing_class") else trainer.tokenizer is tok
    result = trainer.train()
    assert trainer.state.global_step == 2
    assert result.training_loss == result.training_loss  # not NaN


# --------------------------------------------------------------------------- errors


def test_conflicting_tokenizer_spellings_raise_a_clear_error(parts, tmp_path):
    tok, model, data = parts
    with pytest.raises(TypeError) as info:
        SFTTrainer(model=model, args=SFTConfig(**_common(tmp_path)), train_dataset=data,
                   tokenizer=tok, processing_class=object())
    assert "tokenizer" in str(info.value) and "processing_class" in str(info.value)
    assert isinstance(info.value, CompatConflictError) and isinstance(info.value, ValueError)


def test_same_value_under_both_spellings_is_accepted(parts, tmp_path):
    tok, model, data = parts
    trainer = SFTTrainer(model=model, args=SFTConfig(dataset_text_field="text", **_common(tmp_path)),
                         train_dataset=data, tokenizer=tok, processing_class=tok)
    assert (trainer.processing_class if hasattr(trainer, "processing_class") else trainer.tokenizer) is tok


def test_trainer_setting_conflicting_with_config_raises(parts, tmp_path, plugin_log):
    tok, model, data = parts
    config = SFTConfig(dataset_text_field="text", **{_max_length_field(): 32}, **_common(tmp_path))
    call = dict(model=model, args=config, train_dataset=data, **{_tokenizer_name(): tok})
    if "max_seq_length" in _trainer_params():
        # this TRL accepts both and documents that the trainer's value wins: kept, but we say so
        trainer = SFTTrainer(**call, max_seq_length=MAX_LEN)
        assert getattr(trainer.args, _max_length_field()) == MAX_LEN
        assert any("max_seq_length" in r.getMessage() and "accepted" in r.getMessage() for r in plugin_log.records)
    else:
        with pytest.raises(CompatConflictError) as info:
            SFTTrainer(**call, max_seq_length=MAX_LEN)
        assert "max_seq_length" in str(info.value) and _max_length_field() in str(info.value)
    # the same value twice is fine
    config = SFTConfig(dataset_text_field="text", **{_max_length_field(): 32}, **_common(tmp_path))
    trainer = SFTTrainer(**dict(call, args=config), max_seq_length=32)
    assert getattr(trainer.args, _max_length_field()) == 32


@pytest.mark.skipif("dataset_batch_size" in _config_fields() | _trainer_params(),
                    reason="this TRL still has dataset_batch_size")
def test_value_without_a_place_raises_naming_it(parts, tmp_path):
    tok, model, data = parts
    with pytest.raises(TypeError, match="dataset_batch_size"):
        SFTTrainer(model=model, args=SFTConfig(**_common(tmp_path)), train_dataset=data, processing_class=tok,
                   dataset_batch_size=16)


def test_unknown_keyword_fails_exactly_like_stock_trl(parts, tmp_path):
    tok, model, data = parts

    def call():
        SFTTrainer(model=model, args=SFTConfig(**_common(tmp_path)), train_dataset=data,
                   tokenizer=tok, not_a_trl_argument=1)

    with pytest.raises(Exception) as patched:
        call()
    unsloth_patch.remove()
    try:
        with pytest.raises(Exception) as stock:
            SFTTrainer(model=model, args=SFTConfig(**_common(tmp_path)), train_dataset=data,
                       **{_tokenizer_name(): tok}, not_a_trl_argument=1)
    finally:
        unsloth_patch.apply()
    assert type(patched.value) is type(stock.value)
    assert str(patched.value) == str(stock.value)
    assert "not_a_trl_argument" in str(patched.value)


def _tokenizer_name() -> str:
    return "processing_class" if "processing_class" in _trainer_params() else "tokenizer"


# --------------------------------------------------------------------------- warnings, objects, explicitness


def test_one_warning_per_translation(parts, tmp_path, plugin_log):
    tok, model, data = parts
    for _ in range(2):  # a second identical call says nothing new
        _style_trl_011(tmp_path, tok, model, data)
    messages = [r.getMessage() for r in plugin_log.records if r.name == "unsloth_patch"]
    native = _trainer_params()
    expected = [] if "tokenizer" in native else ["tokenizer=...) is spelled SFTTrainer(processing_class="]
    # every TRL of the matrix turns a TrainingArguments into its SFTConfig itself: nothing to say about that
    for name in ("dataset_text_field", "max_seq_length", "packing", "dataset_kwargs"):
        expected.append(f"SFTTrainer({name}=...) belongs in SFTConfig(")
    for fragment in expected:
        hits = [m for m in messages if fragment in m]
        assert len(hits) == 1, (fragment, messages)
    assert len(messages) == len(expected), messages


@pytest.mark.skipif(TRL < Version("0.12"), reason="TRL 0.11 needs dataset_text_field at the trainer level with a "
                    "TrainingArguments: a moved argument, covered by the tests of moves")
def test_training_arguments_that_trl_accepts_convert_without_a_warning(parts, tmp_path, plugin_log):
    tok, model, data = parts
    training_args = TrainingArguments(**_common(tmp_path))
    trainer = SFTTrainer(model=model, args=training_args, train_dataset=data, **{_tokenizer_name(): tok})
    assert isinstance(trainer.args, SFTConfig) and trainer.args.learning_rate == LEARNING_RATE
    assert not [r for r in plugin_log.records if r.name == "unsloth_patch" and "TrainingArguments" in r.getMessage()]
    recorded = explicit_fields(trainer.args)  # what the user passed, not every field
    assert recorded == explicit_fields(training_args) & {f.name for f in dataclasses.fields(SFTConfig)}
    assert "padding_free" not in recorded and "gradient_checkpointing" not in recorded


@pytest.mark.skipif(TRL < Version("0.12"), reason="TRL 0.11 needs dataset_text_field at the trainer level with a "
                    "TrainingArguments: a moved argument, covered by the tests of moves")
def test_trls_own_conversion_keeps_what_the_user_passed(parts, tmp_path):
    tok, model, data = parts
    training_args = TrainingArguments(**_common(tmp_path))
    unsloth_patch.remove(["compat_args", "compat_config"])  # as with UNSLOTH_PATCH_COMPAT=off
    try:
        try:
            trainer = SFTTrainer(model=model, args=training_args, train_dataset=data, **{_tokenizer_name(): tok})
        except KeyError as exc:  # TRL 0.19's own conversion breaks on transformers 5 (push_to_hub_token)
            pytest.skip(f"this TRL cannot convert a TrainingArguments itself ({exc})")
    finally:
        unsloth_patch.apply()
    assert explicit_fields(trainer.args) == explicit_fields(training_args) & {f.name for f in
                                                                             dataclasses.fields(SFTConfig)}


def test_users_objects_are_not_modified(parts, tmp_path):
    tok, model, data = parts
    training_args = TrainingArguments(**_common(tmp_path))
    before = training_args.to_dict()
    trainer = SFTTrainer(model=model, args=training_args, train_dataset=data, **{_tokenizer_name(): tok},
                         dataset_text_field="text")
    assert trainer.args is not training_args
    assert training_args.to_dict() == before
    assert not hasattr(training_args, "dataset_text_field")


def test_explicit_fields_survive_conversion_and_moves(parts, tmp_path):
    tok, model, data = parts
    training_args = TrainingArguments(**_common(tmp_path))
    given = explicit_fields(training_args)
    assert given is not None and "learning_rate" in given
    trainer = SFTTrainer(model=model, args=training_args, train_dataset=data, **{_tokenizer_name(): tok},
                         dataset_text_field="text", packing=False)
    recorded = explicit_fields(trainer.args)
    assert recorded is not None
    assert set(given) <= set(recorded)
    assert {"dataset_text_field", "packing"} <= set(recorded)
    assert "gradient_checkpointing" not in recorded  # a default stays a default


def test_training_arguments_values_win_over_sftconfig_defaults(parts, tmp_path):
    tok, model, data = parts
    training_args = TrainingArguments(**_common(tmp_path))
    trainer = SFTTrainer(model=model, args=training_args, train_dataset=data, **{_tokenizer_name(): tok},
                         dataset_text_field="text")
    for f in dataclasses.fields(TrainingArguments):
        if f.init and not f.name.endswith("_token"):
            assert _comparable(getattr(trainer.args, f.name)) == _comparable(getattr(training_args, f.name)), f.name


def _comparable(value):
    return getattr(value, "value", value) if not isinstance(value, (list, dict)) else repr(value)


def test_no_args_builds_trl_default_config(parts, tmp_path, monkeypatch):
    tok, model, data = parts
    monkeypatch.chdir(tmp_path)
    try:
        SFTConfig(output_dir="probe")
    except ValueError as exc:  # e.g. SFTConfig's bf16 default on a machine without bf16
        pytest.skip(f"TRL's default SFTConfig cannot be built here either: {exc}")
    trainer = SFTTrainer(model=model, train_dataset=data, processing_class=tok, dataset_text_field="text",
                         max_seq_length=MAX_LEN)
    assert isinstance(trainer.args, SFTConfig)
    assert trainer.args.dataset_text_field == "text"
    assert getattr(trainer.args, _max_length_field()) == MAX_LEN
    from unsloth_patch import versions

    if versions.at_least("trl", "0.14"):
        name = (getattr(model.config, "_name_or_path", "") or "").split("/")[-1]
        assert trainer.args.output_dir.endswith(f"{name}-SFT")
    else:
        assert trainer.args.output_dir.endswith("tmp_trainer")


# --------------------------------------------------------------------------- translation logic on any TRL


def _shape(params, config_fields, var_keyword=False):
    cls = dataclasses.make_dataclass("FakeConfig", [(n, object, dataclasses.field(default=None)) for n in config_fields])
    return Shape(tuple(params), var_keyword, cls, tuple(config_fields))


OLD_PARAMS = ("model", "args", "data_collator", "train_dataset", "eval_dataset", "tokenizer", "dataset_text_field")
NEW_PARAMS = ("model", "args", "data_collator", "train_dataset", "eval_dataset", "processing_class")


def test_processing_class_goes_back_to_tokenizer_on_old_trl():
    plan = translate_trainer_call((), {"processing_class": "tok"}, _shape(OLD_PARAMS, ["max_seq_length"]))
    assert plan.kwargs == {"tokenizer": "tok"}


def test_positional_spelling_counts_for_conflicts():
    shape = _shape(NEW_PARAMS, ["max_length"])
    positional = ("m", None, None, "data", None, "tok")
    assert translate_trainer_call(positional, {"tokenizer": "tok"}, shape).kwargs == {}
    with pytest.raises(CompatConflictError):
        translate_trainer_call(positional, {"tokenizer": "other"}, shape)


def test_trainer_settings_go_to_the_config_where_it_has_them():
    # TRL 0.11/0.12 take dataset_text_field in both places and ask for the config
    shape = _shape(OLD_PARAMS, ["output_dir", "dataset_text_field"])
    plan = translate_trainer_call((), {"dataset_text_field": "text"}, shape)
    assert set(plan.kwargs) == {"args"} and plan.kwargs["args"].dataset_text_field == "text"
    # a trainer parameter without a config field stays where the trainer takes it
    plan = translate_trainer_call((), {"dataset_text_field": "text"}, _shape(OLD_PARAMS, ["output_dir"]))
    assert plan.kwargs == {"dataset_text_field": "text"} and not plan.messages


def test_unknown_keywords_pass_through():
    plan = translate_trainer_call((), {"bogus": 1, "tokenizer": "t"}, _shape(NEW_PARAMS, ["max_length"]))
    assert plan.kwargs == {"bogus": 1, "processing_class": "t"}


def test_max_length_maps_to_max_seq_length_on_old_config_and_back():
    old = dataclasses.make_dataclass("OldConfig", [("output_dir", str, None), ("max_seq_length", int, None)])
    new = dataclasses.make_dataclass("NewConfig", [("output_dir", str, None), ("max_length", int, 1024)])
    assert translate_config_call(old, ("o",), {"max_length": 5}).kwargs == {"max_seq_length": 5}
    assert translate_config_call(new, (), {"max_seq_length": 5}).kwargs == {"max_length": 5}
    assert translate_config_call(new, (), {"max_seq_length": 5, "max_length": 5}).kwargs == {"max_length": 5}
    with pytest.raises(CompatConflictError, match="max_seq_length.*max_length"):
        translate_config_call(new, (), {"max_seq_length": 5, "max_length": 6})
    with pytest.raises(CompatUnplaceableError, match="chars_per_token"):
        translate_config_call(new, (), {"chars_per_token": 3.6})


def test_config_handler_translates_installed_sftconfig(plugin_log):
    old_name = "max_length" if _max_length_field() == "max_seq_length" else "max_seq_length"
    if old_name in _config_fields():
        pytest.skip("this TRL's SFTConfig takes both spellings")
    config = SFTConfig(output_dir="unused", **{old_name: 77}, **_cpu())
    assert getattr(config, _max_length_field()) == 77
    assert _max_length_field() in explicit_fields(config)
    assert any(old_name in r.getMessage() for r in plugin_log.records)


def test_default_config_output_dir_follows_trl(monkeypatch):
    from unsloth_patch import versions

    shape = _shape(NEW_PARAMS, ["output_dir", "max_length", "dataset_text_field"])
    model = type("M", (), {"config": type("C", (), {"_name_or_path": "org/tiny-model"})()})()
    plan = translate_trainer_call((), {"model": model, "max_seq_length": 8, "dataset_text_field": "t"}, shape)
    config = plan.kwargs["args"]
    assert (config.max_length, config.dataset_text_field) == (8, "t")
    monkeypatch.setattr(versions, "at_least", lambda dist, minimum: True)
    assert translate_trainer_call((), {"model": model, "max_seq_length": 8}, shape).kwargs["args"].output_dir == (
        "tiny-model-SFT")
    assert translate_trainer_call((), {"model": "org/x", "max_seq_length": 8}, shape).kwargs["args"].output_dir == (
        "x-SFT")
    monkeypatch.setattr(versions, "at_least", lambda dist, minimum: False)
    assert translate_trainer_call((), {"model": model, "max_seq_length": 8}, shape).kwargs["args"].output_dir == (
        "tmp_trainer")
