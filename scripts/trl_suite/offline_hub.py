"""pytest plugin: offline stand-ins for the Hub datasets used by TRL's test_sft_trainer.py, plus an
identical deselection list for tests that cannot run offline / against trl 1.16.0.
Models/tokenizers come from a pre-built fake HF cache (HF_HOME, HF_HUB_OFFLINE=1; tools/build_models.py)."""
import inspect, json, os, re
import datasets
from datasets import Dataset, DatasetDict

ZEN = [
    "Beautiful is better than ugly.", "Explicit is better than implicit.", "Simple is better than complex.",
    "Complex is better than complicated.", "Flat is better than nested.", "Sparse is better than dense.",
    "Readability counts.", "Special cases aren't special enough to break the rules.", "Although practicality beats purity.",
    "Errors should never pass silently.", "Unless explicitly silenced.", "In the face of ambiguity, refuse the temptation to guess.",
    "There should be one-- and preferably only one --obvious way to do it.", "Although that way may not be obvious at first unless you're Dutch.",
    "Now is better than never.", "Although never is often better than *right* now.", "If the implementation is hard to explain, it's a bad idea.",
    "If the implementation is easy to explain, it may be a good idea.", "Namespaces are one honking great idea -- let's do more of those!",
]

def _split(s):
    words = s.split(" ")
    k = max(1, len(words) // 2)
    return " ".join(words[:k]), " " + " ".join(words[k:])

def _zen(config, lines):
    rows = []
    for i, s in enumerate(lines):
        p, c = _split(s)
        bad = lines[(i + 3) % len(lines)]
        _, cr = _split(bad)
        u = lambda x: [{"role": "user", "content": x}]
        a = lambda x: [{"role": "assistant", "content": x.strip()}]
        r = {
            "standard_language_modeling": {"text": s},
            "conversational_language_modeling": {"messages": u("What is rule %d?" % (i + 1)) + a(s)},
            "standard_prompt_only": {"prompt": p},
            "conversational_prompt_only": {"prompt": u(p)},
            "standard_prompt_completion": {"prompt": p, "completion": c},
            "conversational_prompt_completion": {"prompt": u(p), "completion": a(c)},
            "standard_preference": {"prompt": p, "chosen": c, "rejected": cr},
            "conversational_preference": {"prompt": u(p), "chosen": a(c), "rejected": a(cr)},
            "standard_implicit_prompt_preference": {"chosen": s, "rejected": p + cr},
            "conversational_implicit_prompt_preference": {"chosen": u(p) + a(c), "rejected": u(p) + a(cr)},
            "standard_unpaired_preference": {"prompt": p, "completion": c if i % 2 else cr, "label": bool(i % 2)},
            "conversational_unpaired_preference": {"prompt": u(p), "completion": a(c if i % 2 else cr), "label": bool(i % 2)},
            "standard_stepwise_supervision": {"prompt": p, "completions": [c, cr], "labels": [True, False]},
        }[config]
        rows.append(r)
    return rows

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Get the weather in a city.",
     "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city."}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "add", "description": "Add two integers.",
     "parameters": {"type": "object", "properties": {"a": {"type": "integer", "description": "a"}, "b": {"type": "integer", "description": "b"}}, "required": ["a", "b"]}}},
]

def _toolcall(n):
    rows = []
    for i in range(n):
        city = ["Paris", "London", "Tokyo", "Lima"][i % 4]
        msgs = [
            {"role": "user", "content": f"What is the weather in {city}?"},
            {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}]},
            {"role": "tool", "name": "get_weather", "content": f"{10 + i} degrees and sunny"},
            {"role": "assistant", "content": f"It is {10 + i} degrees and sunny in {city}."},
        ]
        rows.append({"messages": msgs, "tools": json.dumps(TOOLS[: 1 + i % 2])})
    return rows

def _harmony(config, lines):
    rows = []
    for i, s in enumerate(lines):
        p, c = _split(s)
        if config == "language_modeling":
            rows.append({"messages": [{"role": "system", "content": "You are a zen master."}, {"role": "user", "content": p},
                                      {"role": "assistant", "thinking": "Recall the zen.", "content": c.strip()}]})
        else:
            rows.append({"prompt": [{"role": "system", "content": "You are a zen master."}, {"role": "user", "content": p}],
                         "completion": [{"role": "assistant", "thinking": "Recall the zen.", "content": c.strip()}]})
    return rows

def _fake(path, name):
    train, test = ZEN[:17], ZEN[17:]
    if path == "trl-internal-testing/zen":
        return DatasetDict(train=Dataset.from_list(_zen(name, train)), test=Dataset.from_list(_zen(name, test)))
    if path == "trl-internal-testing/toolcall":
        return DatasetDict(train=Dataset.from_list(_toolcall(8)), test=Dataset.from_list(_toolcall(2)))
    if path == "trl-internal-testing/harmony":
        return DatasetDict(train=Dataset.from_list(_harmony(name, train)), test=Dataset.from_list(_harmony(name, test)))
    if path == "trl-internal-testing/dolly-chatml-sft":
        rows = [{"messages": [{"role": "user", "content": "Tell me rule %d." % i}, {"role": "assistant", "content": s}]} for i, s in enumerate(ZEN)]
        return DatasetDict(train=Dataset.from_list(rows))
    if path == "stanfordnlp/imdb":
        mk = lambda k: Dataset.from_list([{"text": ("A great movie. " if j % 2 else "A bad film. ") + ZEN[j % len(ZEN)], "label": j % 2} for j in range(k)])
        return DatasetDict(train=mk(100), test=mk(100))
    return None

_SLICE = re.compile(r"^(\w+)(?:\[(\d*):(\d*)(%?)\])?$")

def _apply_split(dd, split):
    m = _SLICE.match(split)
    if not m:
        raise ValueError(f"offline_hub: unsupported split {split!r}")
    ds = dd[m.group(1)]
    if m.group(2) or m.group(3):
        n = len(ds)
        a = int(m.group(2) or 0); b = int(m.group(3)) if m.group(3) else None
        if m.group(4):
            a = n * a // 100; b = None if b is None else n * b // 100
        ds = ds.select(range(a, n if b is None else min(b, n)))
    return ds

_orig_load_dataset = datasets.load_dataset

def load_dataset(path, name=None, *args, split=None, streaming=False, **kwargs):
    dd = _fake(path, name)
    if dd is None:
        return _orig_load_dataset(path, name, *args, split=split, streaming=streaming, **kwargs)
    out = dd if split is None else _apply_split(dd, split)
    if streaming:
        from datasets import IterableDatasetDict
        out = IterableDatasetDict({k: v.to_iterable_dataset() for k, v in out.items()}) if isinstance(out, DatasetDict) else out.to_iterable_dataset()
    return out

datasets.load_dataset = load_dataset
try:
    import datasets.load as _dl
    _dl.load_dataset = load_dataset
except Exception:
    pass

# ---------------------------------------------------------------- identical deselection in every run
UNAVAILABLE = [
    "ForConditionalGeneration",  # vision / multimodal tiny models: not built offline
    "zen-image", "zen-multi-image",  # image datasets
    "tiny-RemoteForCausalLM",  # trust_remote_code repo
    "Qwen/Qwen3-4B", "google/gemma-3n", "kernels-community/",  # real Hub models / kernels
    "_chunked_cross_entropy_loss", "_patch_chunked_ce_lm_head", "dft_loss(",  # absent from trl 1.16.0
]

def _reason(item):
    fn = getattr(item, "function", None)
    body = ""
    if fn is not None:
        try:
            src = inspect.getsource(fn)
            i = src.find("def ")
            body = src[i:] if i >= 0 else src
        except Exception:
            pass
    params = ""
    cs = getattr(item, "callspec", None)
    if cs is not None:
        params = repr(cs.params)
    cls = getattr(item, "cls", None)
    cls_src = ""
    if cls is not None and fn is not None:
        # setup methods of the class (e.g. setup_method loading a VLM / image dataset)
        for meth in ("setup_method", "setUp"):
            if hasattr(cls, meth):
                try:
                    cls_src += inspect.getsource(getattr(cls, meth))
                except Exception:
                    pass
    text = body + params + cls_src
    for u in UNAVAILABLE:
        if u in text:
            return u
    return None

def pytest_collection_modifyitems(session, config, items):
    keep, drop = [], []
    for it in items:
        r = _reason(it)
        (drop if r else keep).append((it, r))
    if drop:
        config.hook.pytest_deselected(items=[it for it, _ in drop])
        items[:] = [it for it, _ in keep]
        out = os.environ.get("OFFLINE_HUB_DESELECTED")
        if out:
            with open(out, "w") as f:
                for it, r in drop:
                    f.write(f"{it.nodeid}\t{r}\n")

# ---------------------------------------------------------------- per-test timeout (no pytest-timeout installed)
import signal
import pytest

_TIMEOUT = int(os.environ.get("OFFLINE_HUB_TIMEOUT", "0"))

class TestTimeout(Exception):
    pass

def _alarm(signum, frame):
    raise TestTimeout(f"test exceeded {_TIMEOUT}s (offline_hub timeout)")

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    if _TIMEOUT:
        old = signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(_TIMEOUT)
    try:
        yield
    finally:
        if _TIMEOUT:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)

# ---------------------------------------------------------------- CPU-only machine: bf16 defaults need use_cpu=True
import torch as _torch
import transformers as _tf

if not _torch.cuda.is_available():
    _orig_post_init = _tf.TrainingArguments.__post_init__

    def _post_init(self, *a, **k):
        self.use_cpu = True
        return _orig_post_init(self, *a, **k)

    _tf.TrainingArguments.__post_init__ = _post_init

# ---------------------------------------------------------------- stand-in for pytest-datadir's fixture (not installed)
import pathlib as _pl, shutil as _sh

@pytest.fixture
def lazy_shared_datadir(request, tmp_path):
    src = _pl.Path(request.path).parent / "data"
    dst = tmp_path / "data"
    _sh.copytree(src, dst)
    return dst
