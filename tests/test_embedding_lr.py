"""Embedding learning rate: config field, exported config, environment, optimizer groups.

Runs with every TRL (0.11.4 - 1.x) / transformers (4.46.3 - 5.x) pair of the matrix: the
trainer helpers below speak each TRL's own argument names.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import math
import os
import pickle
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

import unsloth_patch  # noqa: E402  (activates the patches before TRL/transformers load)
from unsloth_patch import registry  # noqa: E402
from unsloth_patch.patches import embedding_lr  # noqa: E402

import transformers  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

unsloth_patch.apply()
settings = sys.modules["unsloth_patch.settings"]  # the package's settings() function shadows the name

EMB_LR = 2.5e-4
LR = 1e-3
WD = 0.1
TOTAL_STEPS = 10


# --------------------------------------------------------------------------- tiny model, tokenizer, data


def _tiny():
    try:
        from unsloth_patch import tiny
    except ImportError:
        return None
    return tiny if hasattr(tiny, "build_model") and hasattr(tiny, "build_tokenizer") else None


def _local_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(240)]
    vocab = {t: i for i, t in enumerate(["<pad>", "<bos>", "<eos>", "<unk>"] + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<unk>")


@pytest.fixture(scope="module")
def tokenizer():
    tiny = _tiny()
    return tiny.build_tokenizer() if tiny else _local_tokenizer()


@pytest.fixture(scope="module")
def dataset(tokenizer):
    tiny = _tiny()
    if tiny and hasattr(tiny, "chat_dataset"):
        return tiny.chat_dataset(tokenizer, limit=16, format="text")
    from datasets import Dataset

    return Dataset.from_list([{"text": " ".join(f"w{(i * 7 + j) % 240}" for j in range(24))} for i in range(16)])


def build_model(tokenizer, tied: bool):
    tiny = _tiny()
    vocab = len(tokenizer)
    if tiny:
        return tiny.build_model("llama", vocab_size=vocab, hidden_size=32, num_layers=2, num_heads=4,
                                num_kv_heads=2, intermediate_size=64, tie_word_embeddings=tied)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(config)


# --------------------------------------------------------------------------- version-aware trainer helpers


def config_kwargs(output_dir, **extra):
    names = {f.name for f in dataclasses.fields(SFTConfig)}
    kwargs = dict(
        output_dir=str(output_dir), report_to="none", learning_rate=LR, weight_decay=WD,
        lr_scheduler_type="linear", warmup_steps=0, max_steps=3, per_device_train_batch_size=2,
        save_strategy="no", logging_steps=1, bf16=False, fp16=False, dataset_text_field="text",
        seed=0, disable_tqdm=True,
    )
    if "use_cpu" in names:
        kwargs["use_cpu"] = True
    else:  # pragma: no cover - very old transformers
        kwargs["no_cuda"] = True
    kwargs["max_length" if "max_length" in names else "max_seq_length"] = 64
    kwargs.update(extra)
    return kwargs


def make_trainer(model, tokenizer, dataset, args, **extra):
    parameters = inspect.signature(SFTTrainer.__init__).parameters
    kwargs = dict(model=model, args=args, train_dataset=dataset, **extra)
    kwargs["processing_class" if "processing_class" in parameters else "tokenizer"] = tokenizer
    return SFTTrainer(**kwargs)


def stock_create_optimizer(trainer):
    """The optimizer stock transformers builds for ``trainer`` (the patch bypassed)."""
    saved, trainer.optimizer = trainer.optimizer, None
    try:
        return inspect.unwrap(type(trainer).create_optimizer)(trainer)
    finally:
        trainer.optimizer = saved


@pytest.fixture
def env_lr():
    """Set UNSLOTH_PATCH_EMBEDDING_LR's parsed value for one test."""
    saved = settings.current()

    def set_value(value):
        settings.set_current(dataclasses.replace(saved, embedding_lr=value))

    yield set_value
    settings.set_current(saved)


@contextlib.contextmanager
def captured_log():
    records = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    logger = logging.getLogger("unsloth_patch")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def group_of(optimizer):
    return {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}


def check_optimizer(trainer, expected_embedding, embedding_lr):
    """Groups by identity, weight decay vs stock, learning rates after scheduler steps."""
    optimizer = trainer.optimizer
    model = trainer.model
    trainable = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    membership = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(membership) == sorted(trainable), "every trainable parameter exactly once"
    assert len(membership) == len(set(membership))

    expected_ids = {id(p) for p in expected_embedding}
    assert expected_ids and expected_ids <= set(trainable)
    groups = optimizer.param_groups
    assert len(groups) >= 3
    embedding_in_groups = {id(p) for g in groups[2:] for p in g["params"]}
    assert embedding_in_groups == expected_ids
    assert not expected_ids & {id(p) for g in groups[:2] for p in g["params"]}
    for g in groups[2:]:
        assert g["lr"] == pytest.approx(embedding_lr)
    for g in groups[:2]:
        assert g["lr"] == pytest.approx(LR)

    stock = stock_create_optimizer(trainer)
    stock_wd = {id(p): g["weight_decay"] for g in stock.param_groups for p in g["params"]}
    ours_wd = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert ours_wd == stock_wd, "weight decay of every parameter as stock transformers gives it"
    assert any(wd == WD for pid, wd in ours_wd.items() if pid in expected_ids), "embeddings keep their decay"
    # every other optimizer hyperparameter as stock
    for g in groups:
        for key, value in stock.param_groups[0].items():
            if key not in ("params", "lr", "weight_decay", "initial_lr"):
                assert g[key] == value, key

    scheduler = trainer.create_scheduler(num_training_steps=TOTAL_STEPS, optimizer=optimizer)
    steps = 3
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
    factor = 1 - steps / TOTAL_STEPS  # linear, no warmup
    for i, g in enumerate(groups):
        initial = embedding_lr if i >= 2 else LR
        assert g["initial_lr"] == pytest.approx(initial)
        assert g["lr"] == pytest.approx(initial * factor)


# --------------------------------------------------------------------------- the three setups


def test_full_finetuning_untied(tokenizer, dataset, tmp_path):
    model = build_model(tokenizer, tied=False)
    args = SFTConfig(**config_kwargs(tmp_path, embedding_learning_rate=EMB_LR))
    trainer = make_trainer(model, tokenizer, dataset, args)
    with captured_log() as records:
        trainer.create_optimizer()
    emb = [trainer.model.get_input_embeddings().weight, trainer.model.get_output_embeddings().weight]
    assert emb[0] is not emb[1]
    assert len(trainer.optimizer.param_groups) == 3  # both embedding weights decay (they are "*.weight")
    check_optimizer(trainer, emb, EMB_LR)
    lines = [r.getMessage() for r in records if "embedding learning rate" in r.getMessage()]
    assert len(lines) == 1 and records[0].levelno == logging.INFO
    assert "0.00025" in lines[0] and str(sum(p.numel() for p in emb)) in lines[0]


def test_full_finetuning_tied_counts_once(tokenizer, dataset, tmp_path):
    model = build_model(tokenizer, tied=True)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    args = SFTConfig(**config_kwargs(tmp_path, embedding_learning_rate=EMB_LR))
    trainer = make_trainer(model, tokenizer, dataset, args)
    with captured_log() as records:
        trainer.create_optimizer()
    weight = trainer.model.get_input_embeddings().weight
    check_optimizer(trainer, [weight], EMB_LR)
    assert sum(p is weight for g in trainer.optimizer.param_groups for p in g["params"]) == 1
    assert any(str(weight.numel()) in r.getMessage() and "1 tensors" in r.getMessage() for r in records)


@pytest.mark.parametrize("tied", [False, True])
def test_lora_modules_to_save(tokenizer, dataset, tmp_path, tied):
    peft = pytest.importorskip("peft")
    model = build_model(tokenizer, tied=tied)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                           modules_to_save=["embed_tokens", "lm_head"])
    args = SFTConfig(**config_kwargs(tmp_path, embedding_learning_rate=EMB_LR))
    trainer = make_trainer(model, tokenizer, dataset, args, peft_config=lora)
    trainer.create_optimizer()
    copies = [p for n, p in trainer.model.named_parameters() if "modules_to_save" in n and p.requires_grad]
    assert copies, "PEFT made trainable copies of the embeddings"
    check_optimizer(trainer, copies, EMB_LR)
    lora_factors = {id(p) for n, p in trainer.model.named_parameters() if "lora_" in n}
    assert lora_factors <= {id(p) for g in trainer.optimizer.param_groups[:2] for p in g["params"]}


def test_peft_trainable_tokens(tokenizer, dataset, tmp_path):
    peft = pytest.importorskip("peft")
    if "trainable_token_indices" not in {f.name for f in dataclasses.fields(peft.LoraConfig)}:
        pytest.skip("this peft has no trainable-token adapters")
    model = build_model(tokenizer, tied=False)
    lora = peft.LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM", trainable_token_indices=[3, 4, 5])
    args = SFTConfig(**config_kwargs(tmp_path, embedding_learning_rate=EMB_LR))
    trainer = make_trainer(model, tokenizer, dataset, args, peft_config=lora)
    trainer.create_optimizer()
    deltas = [p for n, p in trainer.model.named_parameters() if "trainable_tokens_delta" in n and p.requires_grad]
    assert deltas
    groups = trainer.optimizer.param_groups
    assert {id(p) for g in groups[2:] for p in g["params"]} == {id(p) for p in deltas}
    assert all(g["lr"] == pytest.approx(EMB_LR) for g in groups[2:])


# --------------------------------------------------------------------------- unset: stock, exactly


def _describe(trainer):
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    return [
        ([names[id(p)] for p in g["params"]], {k: v for k, v in g.items() if k != "params"})
        for g in trainer.optimizer.param_groups
    ]


def test_unset_is_stock(tokenizer, dataset, tmp_path, env_lr):
    env_lr(None)
    unsloth_patch.remove()
    try:
        assert not hasattr(SFTConfig, "embedding_learning_rate")
        stock = make_trainer(build_model(tokenizer, tied=False), tokenizer, dataset,
                             SFTConfig(**config_kwargs(tmp_path / "stock")))
        stock.create_optimizer()
        expected = _describe(stock)
    finally:
        unsloth_patch.apply()
    assert "embedding_lr" in registry.applied_names()
    ours = make_trainer(build_model(tokenizer, tied=False), tokenizer, dataset,
                        SFTConfig(**config_kwargs(tmp_path / "ours")))
    with captured_log() as records:
        ours.create_optimizer()
    assert _describe(ours) == expected
    assert len(expected) == 2
    assert not [r for r in records if "embedding" in r.getMessage()]


# --------------------------------------------------------------------------- precedence and validation


def test_precedence(tokenizer, dataset, tmp_path, env_lr):
    from unsloth_patch.config import UnslothSFTConfig

    env_lr(7e-4)
    assert embedding_lr.resolve(SFTConfig(**config_kwargs(tmp_path))) == (7e-4, "UNSLOTH_PATCH_EMBEDDING_LR")
    value, source = embedding_lr.resolve(SFTConfig(**config_kwargs(tmp_path, embedding_learning_rate=3e-4)))
    assert (value, source.split("(")[0]) == (3e-4, "SFTConfig")
    value, source = embedding_lr.resolve(UnslothSFTConfig(**config_kwargs(tmp_path, embedding_learning_rate=4e-4)))
    assert (value, source.split("(")[0]) == (4e-4, "UnslothSFTConfig")
    assert embedding_lr.resolve(UnslothSFTConfig(**config_kwargs(tmp_path)))[0] == 7e-4
    env_lr(None)
    assert embedding_lr.resolve(SFTConfig(**config_kwargs(tmp_path))) == (None, "")

    # end to end: the field beats the environment, the environment alone applies
    env_lr(7e-4)
    for config, expected in ((SFTConfig(**config_kwargs(tmp_path, embedding_learning_rate=3e-4)), 3e-4),
                             (SFTConfig(**config_kwargs(tmp_path)), 7e-4)):
        trainer = make_trainer(build_model(tokenizer, tied=False), tokenizer, dataset, config)
        trainer.create_optimizer()
        assert [g["lr"] for g in trainer.optimizer.param_groups[2:]] == [expected]


@pytest.mark.parametrize("bad", ["abc", "5e-5", 0, -1e-5, float("nan"), float("inf"), True])
def test_invalid_values_name_their_source(tmp_path, bad):
    from unsloth_patch.config import UnslothSFTConfig

    with pytest.raises(ValueError, match=r"SFTConfig\(embedding_learning_rate=\.\.\.\)"):
        SFTConfig(**config_kwargs(tmp_path, embedding_learning_rate=bad))
    with pytest.raises(ValueError, match=r"UnslothSFTConfig\(embedding_learning_rate=\.\.\.\)"):
        UnslothSFTConfig(**config_kwargs(tmp_path, embedding_learning_rate=bad))


@pytest.mark.parametrize("raw", ["abc", "0", "-1", "nan", "inf"])
def test_invalid_environment_value(raw):
    with pytest.raises(ValueError, match="UNSLOTH_PATCH_EMBEDDING_LR"):
        settings.read_settings({"UNSLOTH_PATCH_EMBEDDING_LR": raw})
    assert settings.read_settings({"UNSLOTH_PATCH_EMBEDDING_LR": "5e-5"}).embedding_lr == 5e-5


def test_invalid_value_set_after_construction(tokenizer, dataset, tmp_path):
    args = SFTConfig(**config_kwargs(tmp_path))
    trainer = make_trainer(build_model(tokenizer, tied=False), tokenizer, dataset, args)
    trainer.args.embedding_learning_rate = -1.0
    if "UnslothPatchError" in inspect.getsource(registry.contained):
        with pytest.raises(ValueError, match="embedding learning rate -1.0 from SFTConfig"):
            trainer.create_optimizer()
    else:  # contained: the error is logged and the stock optimizer is built
        trainer.create_optimizer()
        assert len(trainer.optimizer.param_groups) == 2


# --------------------------------------------------------------------------- the config field and class


def test_config_field_is_a_real_field(tmp_path):
    from transformers import HfArgumentParser

    config = SFTConfig(**config_kwargs(tmp_path, embedding_learning_rate=3e-4))
    assert "embedding_learning_rate" in {f.name for f in dataclasses.fields(SFTConfig)}
    assert config.to_dict()["embedding_learning_rate"] == 3e-4
    assert SFTConfig(**config_kwargs(tmp_path)).embedding_learning_rate is None
    again = SFTConfig(**config.to_dict())
    assert again.embedding_learning_rate == 3e-4
    assert dataclasses.replace(config, embedding_learning_rate=1e-4).embedding_learning_rate == 1e-4
    assert pickle.loads(pickle.dumps(config)).embedding_learning_rate == 3e-4
    (parsed,) = HfArgumentParser(SFTConfig).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--embedding_learning_rate", "6e-5", "--bf16", "false"],
        return_remaining_strings=False,
    )
    assert parsed.embedding_learning_rate == 6e-5


def test_exported_config_class(tmp_path):
    from transformers import HfArgumentParser

    from unsloth_patch.config import UnslothSFTConfig

    assert issubclass(UnslothSFTConfig, SFTConfig) and dataclasses.is_dataclass(UnslothSFTConfig)
    config = UnslothSFTConfig(**config_kwargs(tmp_path, embedding_learning_rate=5e-5))
    assert config.to_dict()["embedding_learning_rate"] == 5e-5
    assert pickle.loads(pickle.dumps(config)).embedding_learning_rate == 5e-5
    (parsed,) = HfArgumentParser(UnslothSFTConfig).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--embedding_learning_rate", "6e-5", "--bf16", "false"],
    )
    assert isinstance(parsed, UnslothSFTConfig) and parsed.embedding_learning_rate == 6e-5
    if hasattr(unsloth_patch, "__getattr__"):  # lazy export from the package
        assert unsloth_patch.UnslothSFTConfig is UnslothSFTConfig


def test_package_import_does_not_import_trl():
    import subprocess

    code = "import sys, unsloth_patch; print('trl' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(unsloth_patch.__file__)))
    assert out.stdout.split() == ["False", "False"]


def test_removal_restores_sftconfig(tmp_path):
    def snapshot():
        return (
            vars(SFTConfig)["__init__"],
            list(vars(SFTConfig)["__dataclass_fields__"]),
            dict(vars(SFTConfig).get("__annotations__", {})),
            sorted(vars(SFTConfig)),
        )

    patched = snapshot()
    unsloth_patch.remove()
    try:
        stock = snapshot()
        assert "embedding_learning_rate" not in stock[1] and "embedding_learning_rate" not in stock[2]
        assert not hasattr(SFTConfig, "embedding_learning_rate")
        with pytest.raises(TypeError):
            SFTConfig(**config_kwargs(tmp_path, embedding_learning_rate=1e-4))
    finally:
        unsloth_patch.apply()
    assert snapshot()[1:] == patched[1:]
    unsloth_patch.remove()
    try:
        assert snapshot() == stock
    finally:
        unsloth_patch.apply()


# --------------------------------------------------------------------------- left alone


def test_user_optimizer_left_alone(tokenizer, dataset, tmp_path):
    model = build_model(tokenizer, tied=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    args = SFTConfig(**config_kwargs(tmp_path, embedding_learning_rate=EMB_LR))
    trainer = make_trainer(model, tokenizer, dataset, args, optimizers=(optimizer, None))
    assert trainer.create_optimizer() is optimizer
    assert len(optimizer.param_groups) == 1 and optimizer.param_groups[0]["lr"] == 0.5


def test_optimizer_with_its_own_groups_left_alone(tokenizer, dataset, tmp_path):
    args = SFTConfig(**config_kwargs(tmp_path, embedding_learning_rate=EMB_LR))
    trainer = make_trainer(build_model(tokenizer, tied=False), tokenizer, dataset, args)
    real = trainer.get_optimizer_cls_and_kwargs

    def own_groups(train_args, model=None):  # GaLore-style: the kwargs carry the parameters
        cls, kwargs = real(train_args, model)
        return cls, {**kwargs, "params": [{"params": [p for p in model.parameters() if p.requires_grad]}]}

    trainer.get_optimizer_cls_and_kwargs = own_groups
    with captured_log() as records:
        trainer.create_optimizer()
    assert len(trainer.optimizer.param_groups) == 1
    assert trainer.get_optimizer_cls_and_kwargs is own_groups
    assert any("builds its own parameter groups" in r.getMessage() for r in records)


def test_our_failure_degrades_to_stock(tokenizer, dataset, tmp_path, monkeypatch):
    args = SFTConfig(**config_kwargs(tmp_path, embedding_learning_rate=EMB_LR))
    trainer = make_trainer(build_model(tokenizer, tied=False), tokenizer, dataset, args)

    def broken(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(embedding_lr, "build_groups", broken)
    trainer.create_optimizer()
    assert len(trainer.optimizer.param_groups) == 2
    assert "get_optimizer_cls_and_kwargs" not in vars(trainer)


# --------------------------------------------------------------------------- checkpoint and resume


def test_checkpoint_resume_keeps_groups(tokenizer, dataset, tmp_path):
    kwargs = config_kwargs(tmp_path, embedding_learning_rate=EMB_LR, max_steps=2, save_strategy="steps",
                           save_steps=2, lr_scheduler_type="constant")
    first = make_trainer(build_model(tokenizer, tied=False), tokenizer, dataset, SFTConfig(**kwargs))
    first.train()
    checkpoint = os.path.join(str(tmp_path), "checkpoint-2")
    saved_args = torch.load(os.path.join(checkpoint, "training_args.bin"), weights_only=False)
    assert saved_args.embedding_learning_rate == EMB_LR
    saved = torch.load(os.path.join(checkpoint, "optimizer.pt"), weights_only=False)
    assert [g["lr"] for g in saved["param_groups"]] == [LR, LR, EMB_LR]

    rng_state = os.path.join(checkpoint, "rng_state.pth")
    if os.path.exists(rng_state):  # transformers 4.46 loads it with torch>=2.6's weights_only default: fails
        os.remove(rng_state)  # (numpy arrays inside); unrelated to the optimizer, so leave it out
    kwargs.update(max_steps=3)
    second = make_trainer(build_model(tokenizer, tied=False), tokenizer, dataset, SFTConfig(**kwargs))
    second.train(resume_from_checkpoint=checkpoint)
    groups = second.optimizer.param_groups
    assert [len(g["params"]) for g in groups] == [len(g["params"]) for g in saved["param_groups"]]
    assert [g["lr"] for g in groups] == [LR, LR, EMB_LR]
    model = second.model
    embedding = [model.get_input_embeddings().weight, model.get_output_embeddings().weight]
    assert {id(p) for p in groups[2]["params"]} == {id(p) for p in embedding}
    state = second.optimizer.state[embedding[0]]
    assert int(state["step"]) == 3  # two steps loaded from the checkpoint, one more taken
    assert math.isfinite(float(state["exp_avg"].abs().sum()))


def test_model_argument_of_newer_create_optimizer(tokenizer, dataset, tmp_path):
    """transformers >= 5.3 passes the (accelerate-prepared) model to create_optimizer."""
    if "model" not in inspect.signature(inspect.unwrap(transformers.Trainer.create_optimizer)).parameters:
        pytest.skip("create_optimizer takes no model here")
    args = SFTConfig(**config_kwargs(tmp_path, embedding_learning_rate=EMB_LR))
    trainer = make_trainer(build_model(tokenizer, tied=False), tokenizer, dataset, args)
    other = build_model(tokenizer, tied=False)
    trainer.create_optimizer(model=other)
    groups = trainer.optimizer.param_groups
    assert {id(p) for g in groups[2:] for p in g["params"]} == {
        id(other.get_input_embeddings().weight), id(other.get_output_embeddings().weight)}
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in other.parameters()}
