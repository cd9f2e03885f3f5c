"""Fused RoPE for attention modules that call their modeling module's ``apply_rotary_pos_emb``.

transformers' attention forwards (Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma2 and many more, on
every version from 4.46 on) end their q/k preparation with a call to the module-level function
``apply_rotary_pos_emb(q, k, cos, sin, ...)`` of their modeling file. We change neither that
function, nor the module, nor the class: for one attention *instance* (through ``edits``) we set a
``forward`` that runs the class's own forward function rebuilt with another globals mapping,
:class:`_GlobalsView`, in which ``apply_rotary_pos_emb`` resolves to our fused function while every
other name resolves to the modeling module's live globals (so later rebindings there, such as the
legacy attention path's ``_flash_attention_forward``, are seen). No source text is read or
rewritten: the function is the same code object with other globals. Decorators on the forward
(``deprecate_kwarg`` and the like) are rebuilt around it: each wrapper whose closure holds the next
function down gets a copy of that closure pointing at the rebuilt function.

CPython looks up globals of a function whose globals are a dict *subclass* through ``__getitem__``
(so ``__missing__`` works) on 3.10 to 3.13; TorchDynamo's guards do not (they read the dict
directly), so under ``torch.compile`` the instance forward calls the class forward as it is (and
Inductor fuses the eager RoPE itself).

Before a module is fused, its ``apply_rotary_pos_emb`` must behave: run on a small random probe
(GQA heads, random ``cos``/``sin`` whose halves differ), it must agree with the half-rotation formula
the kernel computes, else the module is left alone with the reason. At run time the fused function
hands anything it cannot take (partial rotary dim, other shapes or layouts, tables that require
grad, extra arguments, CPU tensors outside the Triton interpreter) to the original function.
"""

from __future__ import annotations

import dis
import functools
import inspect
import types
from typing import Optional

from . import fallback
from .settings import triton_interpreting as _interpreting

__all__ = ["ROPE", "NAME", "is_candidate", "fuse", "is_fused"]

ROPE = "fused RoPE"
NAME = "apply_rotary_pos_emb"
_OPTIONAL = ("position_ids", "unsqueeze_dim")  # the optional parameters transformers' versions have had


def _runs_here(t) -> bool:
    return t.device.type == "cuda" or _interpreting()


def _compiling() -> bool:
    import torch

    return torch.compiler.is_compiling()


# ----------------------------------------------------------------------------- the fused function


def _kernel(q, k, cos, sin):
    from .kernels.rope import rope

    return rope(q, k, cos, sin)


def _kernel_available() -> bool:
    from .kernels._triton import triton

    return triton is not None


def _fused_or_none(q, k, cos, sin, unsqueeze_dim):
    """Our RoPE of ``q, k`` if we take these arguments, else None (the caller runs the original)."""
    import torch

    from .kernels.rope import check_arguments

    if not fallback.enabled(ROPE) or _compiling():
        return None
    if not all(isinstance(t, torch.Tensor) for t in (q, k, cos, sin)) or cos.requires_grad or sin.requires_grad:
        return None
    if unsqueeze_dim in (2, -2):  # q, k laid out [B, T, H, D]: rotate transposed views
        transposed = True
        if q.dim() != 4 or k.dim() != 4:
            return None
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    elif unsqueeze_dim in (1, -3):
        transposed = False
    else:
        return None
    if not _runs_here(q) or check_arguments(q, k, cos, sin):
        return None
    try:
        q_out, k_out = _kernel(q, k, cos, sin)
    except Exception as exc:
        if fallback.propagates(exc):
            raise
        fallback.failed(ROPE, exc, "transformers' own apply_rotary_pos_emb")
        return None
    if transposed:
        return q_out.transpose(1, 2), k_out.transpose(1, 2)
    return q_out, k_out


def _signature(original) -> tuple[Optional[tuple], object, str]:
    """``(names after q, k, cos, sin; default unsqueeze_dim; "")`` or ``(None, None, why not)``."""
    try:
        parameters = list(inspect.signature(original).parameters.values())
    except (TypeError, ValueError):
        return None, None, "apply_rotary_pos_emb has no readable signature"
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if len(parameters) < 4 or any(p.kind not in positional or p.default is not inspect.Parameter.empty
                                  for p in parameters[:4]):
        return None, None, "apply_rotary_pos_emb does not take (q, k, cos, sin) first"
    rest = parameters[4:]
    if any(p.name not in _OPTIONAL or p.kind not in positional or p.default is inspect.Parameter.empty
           for p in rest):
        return None, None, f"apply_rotary_pos_emb{inspect.signature(original)} has unknown parameters"
    defaults = {p.name: p.default for p in rest}
    if defaults.get("position_ids") is not None:
        return None, None, "apply_rotary_pos_emb has a position_ids default"
    return tuple(p.name for p in rest), defaults.get("unsqueeze_dim", 1), ""


_fused_for: dict = {}  # original apply_rotary_pos_emb -> our function with its signature


def fused_function(original):
    """Our drop-in for ``original`` (same call signature), or None if its signature is not one we know."""
    if original in _fused_for:
        return _fused_for[original]
    names, default_unsqueeze, why = _signature(original)
    if names is None:
        return None

    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        unsqueeze_dim = default_unsqueeze
        if args or kwargs:
            options = dict(zip(names, args))
            if len(args) > len(names) or any(name in options or name not in names for name in kwargs):
                return original(q, k, cos, sin, *args, **kwargs)
            options.update(kwargs)
            if options.get("position_ids") is not None:  # unused since 4.38; let the original decide
                return original(q, k, cos, sin, *args, **kwargs)
            unsqueeze_dim = options.get("unsqueeze_dim", default_unsqueeze)
        out = _fused_or_none(q, k, cos, sin, unsqueeze_dim)
        return original(q, k, cos, sin, *args, **kwargs) if out is None else out

    apply_rotary_pos_emb._unsloth_original = original  # type: ignore[attr-defined]
    _fused_for[original] = apply_rotary_pos_emb
    return apply_rotary_pos_emb


# ----------------------------------------------------------------------------- the behaviour probe


@functools.lru_cache(maxsize=64)
def _probe(original, head_dim: int) -> str:
    """"" if ``original`` computes the half rotation on a random probe, else why not."""
    import torch

    from .kernels.rope import rope_reference

    names, _, why = _signature(original)
    if names is None:
        return why
    g = torch.Generator().manual_seed(4321)
    batch, tokens = 2, 5
    q = torch.randn(batch, 4, tokens, head_dim, generator=g)
    k = torch.randn(batch, 2, tokens, head_dim, generator=g)
    cos = torch.randn(batch, tokens, head_dim, generator=g)  # random tables: halves differ, so a layout shows
    sin = torch.randn(batch, tokens, head_dim, generator=g)
    expected = rope_reference(q, k, cos, sin)
    calls = [((q, k, cos, sin), {}, expected, False)]
    if "unsqueeze_dim" in names:
        q2, k2 = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()
        calls.append(((q2, k2, cos, sin), {"unsqueeze_dim": 2}, expected, True))
    try:
        with torch.no_grad():
            for args, kwargs, (q_want, k_want), transposed in calls:
                got = original(*args, **kwargs)
                if not (isinstance(got, (tuple, list)) and len(got) == 2):
                    return "apply_rotary_pos_emb does not return (q, k)"
                q_got, k_got = got
                if transposed:
                    q_got, k_got = q_got.transpose(1, 2), k_got.transpose(1, 2)
                for a, b in ((q_got, q_want), (k_got, k_want)):
                    if a.shape != b.shape or a.dtype != b.dtype or not torch.allclose(a, b, rtol=1e-5, atol=1e-5):
                        return "apply_rotary_pos_emb behaves unlike q * cos + rotate_half(q) * sin"
    except Exception as exc:
        return f"probe of apply_rotary_pos_emb failed ({type(exc).__name__})"
    return ""


# ----------------------------------------------------------------------------- rebuilding the forward


class _GlobalsView(dict):
    """Globals of a rebuilt forward: ``apply_rotary_pos_emb`` is ours, every other name the module's, live.

    Only ``__builtins__`` is stored; everything else is looked up in ``live`` at each access. Ours is
    used only while the module's ``apply_rotary_pos_emb`` is still the function we probed.
    """

    __slots__ = ("_live", "_original", "_fused")

    def __init__(self, live: dict, original, fused):
        super().__init__()
        dict.__setitem__(self, "__builtins__", live.get("__builtins__", __builtins__))
        self._live, self._original, self._fused = live, original, fused

    def __missing__(self, key):
        value = self._live[key]
        if key == NAME and value is self._original:
            return self._fused
        return value

    def __contains__(self, key):
        return dict.__contains__(self, key) or key in self._live

    def get(self, key, default=None):
        return self[key] if key in self else default


def _loads_global(code, name: str) -> bool:
    """Whether ``code`` (or a function/comprehension defined in it) reads the global ``name``."""
    for instruction in dis.get_instructions(code):
        if instruction.opname in ("LOAD_GLOBAL", "LOAD_NAME") and instruction.argval == name:
            return True
    return any(isinstance(c, types.CodeType) and _loads_global(c, name) for c in code.co_consts)


def _chain(function) -> tuple[Optional[list], str]:
    """``[outermost wrapper, ..., the function that calls apply_rotary_pos_emb]`` or ``(None, why)``."""
    chain = []
    while True:
        if not isinstance(function, types.FunctionType):
            return None, f"forward is a {type(function).__name__}, not a Python function"
        chain.append(function)
        if _loads_global(function.__code__, NAME):
            return chain, ""
        inner = getattr(function, "__wrapped__", None)
        cells = function.__closure__ or ()
        if inner is None or not any(_cell(c) is inner for c in cells) or len(chain) > 8:
            return None, f"forward does not call {NAME}"
        function = inner


_EMPTY = object()


def _cell(cell):
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return _EMPTY


def _copy(function, globals_, closure):
    new = types.FunctionType(function.__code__, globals_, function.__name__, function.__defaults__, closure)
    new.__kwdefaults__ = function.__kwdefaults__
    new.__qualname__ = function.__qualname__
    new.__module__ = function.__module__
    new.__doc__ = function.__doc__
    new.__dict__.update(function.__dict__)
    return new


def _rebuild(chain: list, fused) -> object:
    inner = chain[-1]
    live = inner.__globals__
    rebuilt = _copy(inner, _GlobalsView(live, live.get(NAME), fused), inner.__closure__)
    for wrapper, below in zip(reversed(chain[:-1]), reversed(chain[1:])):
        closure = tuple(types.CellType(rebuilt) if _cell(c) is below else c for c in wrapper.__closure__)
        outer = _copy(wrapper, wrapper.__globals__, closure)
        if getattr(outer, "__wrapped__", None) is below:
            outer.__wrapped__ = rebuilt
        rebuilt = outer
    return rebuilt


def _head_dim(module) -> int:
    for owner in (module, getattr(module, "config", None)):
        value = getattr(owner, "head_dim", None)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 2:
            return value
    return 16


_plans: dict = {}  # class forward function -> (rebuilt forward or None, why not)


def _plan(forward, head_dim: int) -> tuple[object, str]:
    key = (forward, head_dim)
    if key in _plans:
        return _plans[key]
    chain, why = _chain(forward)
    rebuilt = None
    if chain is not None:
        original = chain[-1].__globals__.get(NAME)
        fused = fused_function(original) if callable(original) else None
        if fused is None:
            why = _signature(original)[2] if callable(original) else f"{NAME} is not a function"
        else:
            why = _probe(original, head_dim)
            if not why:
                rebuilt = _rebuild(chain, fused)
    _plans[key] = (rebuilt, why)
    return rebuilt, why


# ----------------------------------------------------------------------------- the instance forward


def _rope_attention_forward(self, *args, **kwargs):
    forward = type(self).forward  # looked up per call: the legacy attention path may switch the class
    if not _compiling() and fallback.enabled(ROPE):
        plan = _plans.get((forward, self._unsloth_rope_head_dim)) or _plan(forward, self._unsloth_rope_head_dim)
        if plan[0] is not None:
            return plan[0](self, *args, **kwargs)
    return forward(self, *args, **kwargs)


def is_fused(module) -> bool:
    forward = vars(module).get("forward")
    return getattr(forward, "__func__", None) is _rope_attention_forward


@functools.lru_cache(maxsize=256)
def _class_calls_rope(cls) -> bool:
    forward = getattr(cls, "forward", None)
    return isinstance(forward, types.FunctionType) and _chain(forward)[0] is not None


def is_candidate(module) -> bool:
    """Whether ``module``'s class forward calls its modeling module's ``apply_rotary_pos_emb``."""
    return is_fused(module) or _class_calls_rope(type(module))


def fuse(module, edits) -> str:
    """Give ``module`` the fused-RoPE forward through ``edits``; "" on success, else why not."""
    if "forward" in vars(module):
        return "its forward is already replaced on the instance (hooks?)"
    if not _kernel_available():
        return "Triton is not installed"
    head_dim = _head_dim(module)
    rebuilt, why = _plan(type(module).forward, head_dim)
    if rebuilt is None:
        return why
    edits.setattr(module, "_unsloth_rope_head_dim", head_dim)
    edits.setattr(module, "forward", types.MethodType(_rope_attention_forward, module))
    return ""
