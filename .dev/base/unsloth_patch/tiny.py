"""Tiny, offline building blocks: tokenizer, models from configs, chat dataset.

The demo, the tests and the GPU benchmarks need a tokenizer, a model and real
conversational data without touching the Hub. Everything here is built locally
and deterministically, and works on transformers 4.46.3 through 5.x.
transformers / datasets are imported inside the functions so that importing
this module stays cheap.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Iterable

__all__ = [
    "SPECIAL_TOKENS",
    "PAD_ID",
    "BOS_ID",
    "EOS_ID",
    "CHAT_TEMPLATE",
    "FAMILIES",
    "available_families",
    "build_tokenizer",
    "build_model",
    "model_from_config",
    "build_llama_1b_config",
    "build_qwen2_1b_config",
    "build_qwen3_1b_config",
    "chat_dataset",
]

# Order matters: the BPE trainer gives special tokens the first ids, and the model
# configs below rely on pad=0, bos=1, eos=2.
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>"]
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

# One line, no stray whitespace. The assistant content *and* the eos token sit inside
# {% generation %} so assistant-only loss also trains the model to stop.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% elif message['role'] == 'user' or message['role'] == 'system' %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] }}"
    "{% else %}"
    "{{ raise_exception('unsupported role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

# family -> (config class, causal-LM class) names inside transformers
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
}


def available_families() -> list[str]:
    """Families the installed transformers ships (qwen3 needs >= 4.51)."""
    out = []
    for family in FAMILIES:
        try:
            if importlib.util.find_spec(f"transformers.models.{family}") is not None:
                out.append(family)
        except (ImportError, ValueError):
            pass
    return out


# --------------------------------------------------------------------------- tokenizer


def _sample_texts() -> list[str]:
    from .data import load_chat_sample

    return [m["content"] for conv in load_chat_sample() for m in conv["messages"]]


def build_tokenizer(texts: Iterable[str] | None = None, vocab_size: int = 512):
    """Byte-level BPE trained on the shipped chat sample (or ``texts``), with a chat template.

    Byte-level means any text round-trips, so tests can compare decode(encode(x)) == x.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(_sample_texts() if texts is None else texts)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # trim_offsets=False keeps character offsets exact, which the assistant-mask computation relies on
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<|pad|>",
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        model_max_length=4096,
        padding_side="right",
    )
    tok.chat_template = CHAT_TEMPLATE
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (PAD_ID, BOS_ID, EOS_ID)
    return tok


# --------------------------------------------------------------------------- models


def _family_kwargs(family: str, head_dim: int, sliding_window: int | None) -> dict[str, Any]:
    """Per-family config fields; explicit so each transformers version agrees on the shape."""
    if family == "llama":
        return {"head_dim": head_dim}
    if family == "mistral":
        return {"head_dim": head_dim, "sliding_window": sliding_window}
    if family in ("qwen2", "qwen3"):
        kw: dict[str, Any] = {"use_sliding_window": sliding_window is not None}
        if sliding_window is not None:
            # max_window_layers=0: every layer slides. 4.46 applies the window to all layers on
            # sdpa regardless, later versions only to layers >= max_window_layers; 0 makes them agree.
            kw.update(sliding_window=sliding_window, max_window_layers=0)
        if family == "qwen3":
            kw["head_dim"] = head_dim  # Qwen3Config defaults to 128
        return kw
    if family == "gemma":
        return {"head_dim": head_dim}  # GemmaConfig defaults to 256
    if family == "gemma2":
        kw = {"head_dim": head_dim, "query_pre_attn_scalar": head_dim}
        if sliding_window is not None:
            kw["sliding_window"] = sliding_window  # even layers local, odd layers global
        return kw
    raise ValueError(f"unknown family {family!r}; choose from {sorted(FAMILIES)}")


def model_from_config(config, attn_implementation: str | None = "sdpa", dtype=None, seed: int = 0, device=None):
    """Random-weight ``*ForCausalLM`` for ``config``, seeded so two builds are identical.

    ``attn_implementation`` is passed to ``AutoModelForCausalLM.from_config`` (supported
    from 4.46 through 5.x). Gemma2 asks for sdpa get eager while attention softcapping
    is on: transformers 5 refuses sdpa there and 4.x silently drops the softcap.
    ``device`` builds the weights directly there (e.g. "cuda" for the 1B benchmark configs).
    """
    import torch
    from transformers import AutoModelForCausalLM

    if (
        attn_implementation == "sdpa"
        and getattr(config, "model_type", None) == "gemma2"
        and getattr(config, "attn_logit_softcapping", None) is not None
    ):
        attn_implementation = "eager"
    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    torch.manual_seed(seed)
    if device is not None:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, **kwargs)
    else:
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    if dtype is not None:
        model = model.to(dtype)
    return model


def build_model(
    family: str = "llama",
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 4096,
    attn_implementation: str | None = "sdpa",
    dtype=None,
    seed: int = 0,
    sliding_window: int | None = None,
    device=None,
    **config_overrides: Any,
):
    """Tiny random ``*ForCausalLM`` of ``family`` whose special ids match :func:`build_tokenizer`.

    ``sliding_window`` turns on the window for mistral/qwen2/qwen3 and overrides
    gemma2's local-layer window (gemma2 always alternates local/global layers and
    softcaps). ``dtype`` defaults to float32; extra keyword arguments go to the config.
    """
    import transformers

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {sorted(FAMILIES)}")
    if family not in available_families():
        raise ValueError(f"transformers {transformers.__version__} has no {family!r} models")
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError("hidden_size must divide by num_heads and num_heads by num_kv_heads")
    config_cls = getattr(transformers, FAMILIES[family][0])
    kwargs: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    kwargs.update(_family_kwargs(family, hidden_size // num_heads, sliding_window))
    kwargs.update(config_overrides)
    config = config_cls(**kwargs)
    return model_from_config(config, attn_implementation=attn_implementation, dtype=dtype, seed=seed, device=device)


def build_llama_1b_config(**overrides: Any):
    """Llama-shaped ~1.10B config for GPU benchmarks (Llama-3.2-1B body, 32k vocab, untied).

    16 layers x (attn 10.5M + MLP 50.3M) + 2 x 65.5M embeddings = 1.10B parameters.
    """
    from transformers import LlamaConfig

    kw: dict[str, Any] = dict(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def build_qwen2_1b_config(**overrides: Any):
    """Qwen2-shaped ~1.08B config with Qwen2's real 151936 vocabulary (large-vocab loss path).

    Same attention shape as the Llama config (plus Qwen2's qkv bias), tied embeddings like
    the small Qwen2 models, MLP 6144 so the total stays near the Llama one:
    16 x (10.5M + 37.7M) + 311M embeddings = 1.08B parameters.
    """
    from transformers import Qwen2Config

    kw: dict[str, Any] = dict(
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        use_sliding_window=False,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    kw.update(overrides)
    return Qwen2Config(**kw)


def build_qwen3_1b_config(**overrides: Any):
    """Qwen3-shaped ~1.1B config (the second family of the benchmarks): per-head q/k norms, head dim 128.

    Qwen3-1.7B's body at 16 layers with a 32k vocabulary, untied: 16 x (attn 12.6M + MLP 37.7M) +
    2 x 65.5M embeddings = 0.94B parameters.
    """
    from transformers import Qwen3Config

    kw: dict[str, Any] = dict(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
        use_sliding_window=False,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    kw.update(overrides)
    return Qwen3Config(**kw)


# --------------------------------------------------------------------------- data


def chat_dataset(tokenizer=None, limit: int | None = None, format: str = "messages"):
    """The shipped chat sample as a ``datasets.Dataset`` in one of TRL's formats.

    ``messages``: conversational language modeling; ``text``: the chat template rendered
    to a string (needs a tokenizer; the default one is built if none is given);
    ``prompt_completion``: conversational prompt/completion, the last assistant turn
    being the completion.
    """
    from datasets import Dataset

    from .data import load_chat_sample

    rows = load_chat_sample(limit)
    if format == "messages":
        return Dataset.from_list(rows)
    if format == "text":
        tok = tokenizer if tokenizer is not None else build_tokenizer()
        return Dataset.from_list([{"text": tok.apply_chat_template(r["messages"], tokenize=False)} for r in rows])
    if format == "prompt_completion":
        out = []
        for r in rows:
            msgs = r["messages"]
            last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
            out.append({"prompt": msgs[:last], "completion": [msgs[last]]})
        return Dataset.from_list(out)
    raise ValueError(f"unknown format {format!r}; use 'messages', 'text' or 'prompt_completion'")
