"""Build tiny random stand-ins for the trl-internal-testing/tiny-* models into an offline HF hub cache."""
import os, sys, json, pathlib, traceback
HF_HOME = pathlib.Path(os.environ["HF_HOME"])
HUB = HF_HOME / "hub"
import torch, transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast
import trl
TPL = pathlib.Path(trl.__file__).parent / "chat_templates"

SPECIALS = """<|endoftext|> <|im_start|> <|im_end|> <|begin_of_text|> <|end_of_text|> <|start_header_id|> <|end_header_id|>
<|eot_id|> <|eom_id|> <|finetune_right_pad_id|> <|python_tag|> <s> </s> <unk> <pad> <bos> <eos> <start_of_turn> <end_of_turn>
[INST] [/INST] <|user|> <|assistant|> <|system|> <|end|> <|start|> <|message|> <|channel|> <|return|> <|call|> <|constrain|>
<|START_OF_TURN_TOKEN|> <|END_OF_TURN_TOKEN|> <|USER_TOKEN|> <|CHATBOT_TOKEN|> <|SYSTEM_TOKEN|> <|START_RESPONSE|> <|END_RESPONSE|>
<|begin▁of▁sentence|> <|end▁of▁sentence|> <|User|> <|Assistant|> <|tool▁calls▁begin|> <|tool▁calls▁end|>
[gMASK] <sop> <|observation|> <think> </think> <tool_call> </tool_call> <tool_response> </tool_response>
<|pad|> <SPECIAL_10> <SPECIAL_11> <SPECIAL_12>""".split()

def corpus():
    words = ("Beautiful is better than ugly. Explicit is better than implicit. Simple is better than complex. "
             "Complex is better than complicated. Flat is better than nested. Sparse is better than dense. "
             "Readability counts. Special cases aren't special enough to break the rules. Although practicality beats purity. "
             "Errors should never pass silently. Unless explicitly silenced. In the face of ambiguity, refuse the temptation to guess. "
             "There should be one-- and preferably only one --obvious way to do it. Now is better than never. "
             "If the implementation is hard to explain, it's a bad idea. Namespaces are one honking great idea. "
             "What is the weather? The answer is 42. system user assistant tool function name arguments content role "
             "The sky is blue. The cat sat on the mat. Hello world, how are you? I am fine, thank you.")
    out = [words] * 4
    for f in TPL.glob("*.jinja"):
        out.append(f.read_text())
    return out

def make_backend(vocab_size=1024):
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    tr = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(corpus(), trainer=tr)
    return backend

MISTRAL_TPL = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
               "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")
CHATML_TPL = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

S = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
# id suffix -> (config class, extra config kwargs, template (file or str), bos, eos, pad)
SPECS = {
    "tiny-Qwen2ForCausalLM-2.5": ("Qwen2Config", {}, "qwen2_5.jinja", None, "<|im_end|>", "<|endoftext|>"),
    "tiny-Qwen3ForCausalLM": ("Qwen3Config", {"head_dim": 4}, "qwen3.jinja", None, "<|im_end|>", "<|endoftext|>"),
    "tiny-Qwen3MoeForCausalLM": ("Qwen3MoeConfig", {"head_dim": 4, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16}, "qwen3.jinja", None, "<|im_end|>", "<|endoftext|>"),
    "tiny-LlamaForCausalLM-3.2": ("LlamaConfig", {}, "llama3_2.jinja", "<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>"),
    "tiny-LlamaForCausalLM-3.1": ("LlamaConfig", {}, "llama3_1.jinja", "<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>"),
    "tiny-LlamaForCausalLM-3": ("LlamaConfig", {}, "llama3.jinja", "<|begin_of_text|>", "<|eot_id|>", None),
    "tiny-MistralForCausalLM-0.1": ("MistralConfig", {}, MISTRAL_TPL, "<s>", "</s>", None),
    "tiny-MistralForCausalLM-0.2": ("MistralConfig", {}, MISTRAL_TPL, "<s>", "</s>", None),
    "tiny-GptOssForCausalLM": ("GptOssConfig", {"head_dim": 4, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 8}, "gptoss.jinja", "<|startoftext|>", "<|return|>", "<|endoftext|>"),
    "tiny-GemmaForCausalLM": ("GemmaConfig", {"head_dim": 4}, "gemma.jinja", "<bos>", "<eos>", "<pad>"),
    "tiny-Gemma2ForCausalLM": ("Gemma2Config", {"head_dim": 4, "query_pre_attn_scalar": 4, "sliding_window": 8}, "gemma.jinja", "<bos>", "<eos>", "<pad>"),
    "tiny-Phi3ForCausalLM": ("Phi3Config", {"pad_token_id": None}, "phi3.jinja", "<s>", "<|endoftext|>", "<|endoftext|>"),
    "tiny-CohereForCausalLM": ("CohereConfig", {}, "cohere.jinja", "<bos>", "<|END_OF_TURN_TOKEN|>", "<pad>"),
    "tiny-Cohere2ForCausalLM": ("Cohere2Config", {"sliding_window": 8}, "cohere2.jinja", "<bos>", "<|END_OF_TURN_TOKEN|>", "<pad>"),
    "tiny-DeepseekV3ForCausalLM": ("DeepseekV3Config", {"kv_lora_rank": 8, "q_lora_rank": 8, "qk_rope_head_dim": 4, "qk_nope_head_dim": 4, "v_head_dim": 4, "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1}, "deepseekv3.jinja", "<|begin▁of▁sentence|>", "<|end▁of▁sentence|>", "<|end▁of▁sentence|>"),
    "tiny-DeepseekV3ForCausalLM-0528": ("DeepseekV3Config", {"kv_lora_rank": 8, "q_lora_rank": 8, "qk_rope_head_dim": 4, "qk_nope_head_dim": 4, "v_head_dim": 4, "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1}, "deepseekv3.jinja", "<|begin▁of▁sentence|>", "<|end▁of▁sentence|>", "<|end▁of▁sentence|>"),
    "tiny-Glm4MoeForCausalLM": ("Glm4MoeConfig", {"head_dim": 4, "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1}, "glm4moe.jinja", None, "<|endoftext|>", "<|endoftext|>"),
    "tiny-GPTNeoXForCausalLM": ("GPTNeoXConfig", {}, None, "<|endoftext|>", "<|endoftext|>", None),
    "tiny-Olmo3ForCausalLM": ("Olmo3Config", {"sliding_window": 8}, CHATML_TPL, None, "<|endoftext|>", "<|pad|>"),
    "tiny-NemotronHForCausalLM-nano": ("NemotronHConfig", {}, "nemotron_3_nano.jinja", "<s>", "<|im_end|>", "<|endoftext|>"),
}

def save_to_cache(repo_id, src_dir_writer):
    org, name = repo_id.split("/")
    root = HUB / f"models--{org}--{name}"
    sha = "0" * 40
    snap = root / "snapshots" / sha
    snap.mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(sha)
    src_dir_writer(str(snap))
    return snap

def build(name, backend):
    cfg_cls, extra, tpl, bos, eos, pad = SPECS[name]
    kw = {}
    if bos and bos not in SPECIALS: bos = None
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(backend.to_str()), bos_token=bos, eos_token=eos,
                                  pad_token=pad, unk_token=None, model_max_length=1024, padding_side="right")
    if tpl is not None:
        tok.chat_template = (TPL / tpl).read_text() if tpl.endswith(".jinja") else tpl
    cfg_kwargs = dict(S, vocab_size=len(tok), max_position_embeddings=1024,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if cfg_cls == "GPTNeoXConfig":
        cfg_kwargs.pop("num_key_value_heads")
    if cfg_cls == "NemotronHConfig":
        cfg_kwargs.update(hybrid_override_pattern="M*", mamba_num_heads=4, mamba_head_dim=4, ssm_state_size=8, n_groups=1, mamba_n_groups=1)
    cfg_kwargs.update(extra)
    config = getattr(transformers, cfg_cls)(**cfg_kwargs)
    arch = name.replace("tiny-", "").split("-")[0]
    config.architectures = [arch]
    torch.manual_seed(0)
    model = getattr(transformers, arch)(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    def writer(d):
        model.save_pretrained(d)
        tok.save_pretrained(d)
    snap = save_to_cache("trl-internal-testing/" + name, writer)
    return sum(p.numel() for p in model.parameters())

if __name__ == "__main__":
    backend = make_backend()
    only = sys.argv[1:]
    for name in SPECS:
        if only and name not in only: continue
        try:
            n = build(name, backend)
            print("OK ", name, n)
        except Exception as e:
            print("ERR", name, type(e).__name__, str(e)[:300])
