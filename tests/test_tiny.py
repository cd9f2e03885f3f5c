"""The offline builders (tokenizer, tiny models, chat sample) that the demo and tests rely on."""

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from unsloth_patch import tiny
from unsloth_patch.data import SAMPLE_LICENSE, load_chat_sample

CONVO = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hi there"},
    {"role": "assistant", "content": "hello! how are you?"},
    {"role": "user", "content": "fine"},
    {"role": "assistant", "content": "good"},
]


@pytest.fixture(scope="module")
def tok():
    return tiny.build_tokenizer()


# ------------------------------------------------------------------ sample


def test_sample_has_alternating_real_conversations():
    rows = load_chat_sample()
    assert len(rows) >= 300
    for row in rows:
        msgs = row["messages"]
        assert len(msgs) >= 2 and len(msgs) % 2 == 0
        assert [m["role"] for m in msgs] == ["user", "assistant"] * (len(msgs) // 2)
        assert all(isinstance(m["content"], str) and m["content"].strip() for m in msgs)
    assert len(load_chat_sample(limit=7)) == 7


def test_sample_ships_license_notice():
    text = SAMPLE_LICENSE.read_text(encoding="utf-8")
    assert "MIT License" in text
    assert "Copyright (c) 2019 Perception, Control and Cognition Lab" in text


def test_import_is_cheap():
    code = "import sys, unsloth_patch.tiny, unsloth_patch.data; print('transformers' in sys.modules, 'datasets' in sys.modules)"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# ------------------------------------------------------------------ tokenizer


def test_tokenizer_special_tokens_and_round_trip(tok):
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (tiny.PAD_ID, tiny.BOS_ID, tiny.EOS_ID)
    assert len(tok) == 512
    for text in ["héllo wörld 🙂  tabs\tand\nnewlines", load_chat_sample(1)[0]["messages"][0]["content"]]:
        assert tok.decode(tok(text)["input_ids"]) == text
    # no special tokens are added implicitly; the chat template owns bos/eos
    assert tok("hi")["input_ids"][0] != tok.bos_token_id


def test_tokenizer_is_deterministic(tok):
    again = tiny.build_tokenizer()
    assert again.get_vocab() == tok.get_vocab()
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()


def test_chat_template_renders(tok):
    text = tok.apply_chat_template(CONVO, tokenize=False)
    assert text == (
        "<|bos|><|system|>Be brief.<|user|>hi there<|assistant|>hello! how are you?<|eos|>"
        "<|user|>fine<|assistant|>good<|eos|>"
    )
    prompt = tok.apply_chat_template(CONVO[:2], tokenize=False, add_generation_prompt=True)
    assert text.startswith(prompt) and prompt.endswith("<|assistant|>")
    assert "{% generation %}" in tok.chat_template and "{% endgeneration %}" in tok.chat_template


def test_assistant_mask_covers_replies_and_eos(tok):
    out = tok.apply_chat_template(CONVO, return_assistant_tokens_mask=True, return_dict=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(ids) == len(mask) and 0 < sum(mask) < len(mask)
    masked = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(masked) == "hello! how are you?<|eos|>good<|eos|>"
    assert masked.count(tok.eos_token_id) == 2


def test_trl_accepts_template(tok):
    utils = pytest.importorskip("trl.chat_template_utils")
    if hasattr(utils, "has_generation_markers"):
        assert utils.has_generation_markers(tok.chat_template)
    if hasattr(utils, "is_chat_template_stop_token_trained"):
        assert utils.is_chat_template_stop_token_trained(tok)


# ------------------------------------------------------------------ models


def test_available_families():
    fams = tiny.available_families()
    assert {"llama", "mistral", "qwen2", "gemma", "gemma2"} <= set(fams)
    assert set(fams) <= set(tiny.FAMILIES)


@pytest.mark.parametrize("family", tiny.available_families())
def test_family_builds_and_trains(family):
    model = tiny.build_model(family, sliding_window=8 if family != "llama" and family != "gemma" else None)
    assert type(model).__name__.endswith("ForCausalLM")
    cfg = model.config
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (0, 1, 2)
    assert getattr(cfg, "head_dim", 16) == 16
    if family != "gemma2":
        assert cfg._attn_implementation == "sdpa"
    else:  # softcapping needs eager
        assert cfg._attn_implementation == "eager" and cfg.attn_logit_softcapping is not None
    if family in ("mistral", "qwen2", "qwen3", "gemma2"):
        assert cfg.sliding_window == 8
    ids = torch.randint(6, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 18:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits.shape == (2, 24, 512)
    assert torch.isfinite(out.loss) and 5.0 < out.loss.item() < 7.5  # ~ln(512) at init
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_models_are_deterministic():
    a = tiny.build_model("qwen2", seed=3).state_dict()
    b = tiny.build_model("qwen2", seed=3).state_dict()
    c = tiny.build_model("qwen2", seed=4).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].dim() == 2)


def test_dtype_and_overrides():
    model = tiny.build_model("llama", dtype=torch.bfloat16, attn_implementation="eager", rms_norm_eps=1e-5)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager" and model.config.rms_norm_eps == 1e-5
    with pytest.raises(ValueError):
        tiny.build_model("gpt2")


@pytest.mark.parametrize("builder,expected", [(tiny.build_llama_1b_config, 1.10e9), (tiny.build_qwen2_1b_config, 1.08e9)])
def test_benchmark_configs_are_about_1b(builder, expected):
    from transformers import AutoModelForCausalLM

    config = builder()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - expected) / expected < 0.01
    assert config.hidden_size == 2048 and config.num_hidden_layers == 16
    assert config.num_attention_heads == 32 and config.num_key_value_heads == 8


def test_qwen2_1b_config_uses_real_vocab():
    assert tiny.build_qwen2_1b_config().vocab_size == 151936
    assert tiny.build_llama_1b_config(num_hidden_layers=2).num_hidden_layers == 2


# ------------------------------------------------------------------ datasets


def test_chat_dataset_formats(tok):
    ds = tiny.chat_dataset(limit=10)
    assert len(ds) == 10 and ds.column_names == ["messages"]
    text = tiny.chat_dataset(tok, limit=3, format="text")
    assert text[0]["text"].startswith("<|bos|><|user|>") and text[0]["text"].endswith("<|eos|>")
    pc = tiny.chat_dataset(limit=5, format="prompt_completion")
    row = pc[0]
    assert row["completion"][0]["role"] == "assistant" and row["prompt"][-1]["role"] == "user"
    assert row["prompt"] + row["completion"] == ds[0]["messages"]
    with pytest.raises(ValueError):
        tiny.chat_dataset(limit=1, format="nope")


def test_sft_assistant_only_loss(tok, tmp_path):
    """TRL versions with assistant_only_loss build a non-trivial mask from the template."""
    trl = pytest.importorskip("trl")
    fields = {f.name for f in dataclasses.fields(trl.SFTConfig)}
    if "assistant_only_loss" not in fields:
        pytest.skip("this TRL has no assistant_only_loss")
    args = trl.SFTConfig(
        output_dir=str(tmp_path), assistant_only_loss=True, max_length=128, per_device_train_batch_size=2,
        max_steps=1, report_to="none", save_strategy="no", use_cpu=True, bf16=False, gradient_checkpointing=False,
    )
    trainer = trl.SFTTrainer(
        model=tiny.build_model("llama"), args=args, train_dataset=tiny.chat_dataset(limit=4), processing_class=tok
    )
    row = trainer.train_dataset[0]
    if "assistant_masks" in row:
        mask = row["assistant_masks"]
    else:  # newer TRL folds the mask into the labels
        mask = [int(label != -100) for label in row["labels"]]
    assert 0 < sum(mask) < len(mask)
    trained = [i for i, m in zip(row["input_ids"], mask) if m]
    assert tok.eos_token_id in trained
    assert tok.convert_tokens_to_ids("<|user|>") not in trained
    trainer.train()
    assert trainer.state.global_step == 1
