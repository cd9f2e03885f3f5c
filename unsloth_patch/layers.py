"""Which modules of a model get a fused forward, and the fused forwards themselves.

:func:`fuse_model_layers` walks a model once, after TRL built the trainer, and replaces the
``forward`` of each module instance it recognises (through ``edits``, so a rollback restores
the original exactly):

* **RMSNorm**: class name ending in ``RMSNorm``, a 1-D ``weight`` matching the normalised
  size, an epsilon in ``variance_epsilon`` or ``eps``, a ``forward(x)`` of one argument, and
  behaviour: the module's own forward, run once on a small random probe, must agree with
  ``weight * x_normed`` (Llama, Mistral, Qwen2, Qwen3 including its per-head q/k norms) or
  ``(1 + weight) * x_normed`` (Gemma). Anything else is left alone.
* **Gated MLP**: ``gate_proj``, ``up_proj``, ``down_proj`` and ``act_fn`` children, a forward
  whose body is exactly ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` (checked on its source),
  and an ``act_fn`` that behaves as SiLU or tanh-GELU on a probe. Only the elementwise
  ``act(gate) * up`` is fused; the projections are still called as modules, so LoRA layers
  on them (PEFT) keep working, as do hooks and gradient checkpointing.
* **RoPE** (``unsloth_patch/rope_fusion.py``): attention modules whose class forward calls the
  modeling module's ``apply_rotary_pos_emb``, when that function behaves as the half rotation on a
  probe; the instance runs its class forward with our fused q/k rotation in that call.

Nothing happens unless ``UNSLOTH_PATCH_KERNELS=auto`` (the default), Triton imports, and the
model's parameters are on a CUDA device in bf16, fp16 or fp32; ``force=True`` skips the device
checks (used to run the kernels under ``TRITON_INTERPRET=1`` on CPU). A fused forward falls
back to the original for inputs it cannot take (a CPU tensor outside the interpreter).
``UNSLOTH_PATCH_KERNELS_OFF`` leaves single kernels out (``rmsnorm``, ``swiglu``, ``rope``).
"""

from __future__ import annotations

import ast
import functools
import inspect
import logging
import types
from typing import Optional

from . import fallback, log, mlp_recompute, rope_fusion, source_ast
from .settings import triton_interpreting as _interpreting

__all__ = ["fuse_model_layers", "last_fusion", "is_fused"]

SUPPORTED_DTYPES = ("torch.bfloat16", "torch.float16", "torch.float32")

_last: dict = {"fused": {}, "skipped": {}, "reason": "not run yet"}


def last_fusion() -> dict:
    """What the last :func:`fuse_model_layers` call did: counts per kind, skips, and why."""
    return {"fused": dict(_last["fused"]), "skipped": dict(_last["skipped"]), "reason": _last["reason"]}


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------- fused forwards


def _runs_here(t) -> bool:
    return t.device.type == "cuda" or _interpreting()


RMSNORM, GATED_MLP = "fused RMSNorm", "fused gated MLP"


def _rmsnorm_forward(self, hidden_states):
    if not (_runs_here(hidden_states) and fallback.enabled(RMSNORM)):
        return type(self).forward(self, hidden_states)
    try:
        from .kernels.rmsnorm import rms_norm

        return rms_norm(hidden_states, self.weight, self._unsloth_eps, self._unsloth_offset)
    except Exception as exc:
        if fallback.propagates(exc):
            raise
        fallback.failed(RMSNORM, exc, "the module's own forward")
        return type(self).forward(self, hidden_states)


def _gated_mlp_forward(self, x):
    chunked = mlp_recompute.forward(self, x)  # inside an mlp_recompute checkpoint: nothing but x kept
    if chunked is not None:
        return chunked
    gate = self.gate_proj(x)
    up = self.up_proj(x)
    if not (_runs_here(gate) and fallback.enabled(GATED_MLP)) or gate.shape != up.shape:
        return self.down_proj(self.act_fn(gate) * up)
    try:
        from .kernels.swiglu import gated_activation

        hidden = gated_activation(gate, up, self._unsloth_activation)
    except Exception as exc:
        if fallback.propagates(exc):
            raise
        fallback.failed(GATED_MLP, exc, "the module's own act_fn(gate) * up")
        hidden = self.act_fn(gate) * up
    return self.down_proj(hidden)


_FUSED = {_rmsnorm_forward: "rmsnorm", _gated_mlp_forward: "mlp"}


def _is_fused_mlp(module) -> bool:
    return getattr(vars(module).get("forward"), "__func__", None) is _gated_mlp_forward


def is_fused(module) -> bool:
    forward = vars(module).get("forward")
    return getattr(forward, "__func__", None) in _FUSED or rope_fusion.is_fused(module)


def _fused_kind(module) -> str:
    if rope_fusion.is_fused(module):
        return "rope"
    if vars(module)["forward"].__func__ is _rmsnorm_forward:
        return "rmsnorm_gemma" if module._unsloth_offset else "rmsnorm"
    return "swiglu" if module._unsloth_activation == "silu" else "geglu"


# ----------------------------------------------------------------------------- recognition


def _epsilon(module) -> Optional[float]:
    for name in ("variance_epsilon", "eps"):
        value = getattr(module, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _single_argument(forward) -> bool:
    try:
        parameters = list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):
        return False
    return len(parameters) == 1 and parameters[0].kind in (
        inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _rmsnorm_offset(module) -> tuple[Optional[float], str]:
    """``(offset, "")`` for a recognised RMSNorm, else ``(None, why not)``."""
    import torch

    from .kernels.rmsnorm import rms_norm_reference

    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.nn.Parameter) or weight.dim() != 1 or weight.numel() == 0:
        return None, "no 1-D weight"
    eps = _epsilon(module)
    if eps is None:
        return None, "no variance_epsilon/eps"
    if list(module.children()) or not _single_argument(module.forward):
        return None, "forward is not norm(x)"
    n = weight.shape[0]
    generator = torch.Generator().manual_seed(1234)
    probe = torch.randn(3, n, generator=generator).mul_(2).add_(0.5).to(weight.device)
    try:
        with torch.no_grad():
            actual = module.forward(probe).float()
            for offset in (0.0, 1.0):
                expected = rms_norm_reference(probe, weight, eps, offset).float()
                if actual.shape == expected.shape and torch.allclose(actual, expected, rtol=1e-3, atol=1e-4):
                    return offset, ""
    except Exception as exc:  # a forward that wants something else
        return None, f"probe failed ({type(exc).__name__})"
    return None, "behaves unlike weight*x_normed and (1+weight)*x_normed"


def _activation_kind(act_fn) -> Optional[str]:
    import torch

    if not callable(act_fn):
        return None
    probe = torch.linspace(-8.0, 8.0, 129, dtype=torch.float32)
    try:
        with torch.no_grad():
            actual = act_fn(probe)
    except Exception:
        return None
    if not isinstance(actual, torch.Tensor) or actual.shape != probe.shape:
        return None
    candidates = {
        "silu": torch.nn.functional.silu(probe),
        "gelu_tanh": torch.nn.functional.gelu(probe, approximate="tanh"),
    }
    for name, expected in candidates.items():
        if torch.allclose(actual.float(), expected, rtol=1e-5, atol=1e-6):
            return name
    return None


@functools.lru_cache(maxsize=64)
def _standard_gated_forward(cls) -> bool:
    """Whether ``cls.forward`` is exactly ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``."""
    function = source_ast.definition(cls.forward)
    if function is None:
        return False
    arguments = function.args
    if arguments.vararg or arguments.kwarg or arguments.kwonlyargs or len(arguments.args) != 2:
        return False
    x = arguments.args[1].arg
    body = list(function.body)
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        body = body[1:]  # docstring
    wanted = f"self.down_proj(self.act_fn(self.gate_proj({x})) * self.up_proj({x}))"
    if len(body) == 1 and isinstance(body[0], ast.Return) and body[0].value is not None:
        return ast.unparse(body[0].value) == wanted
    if (len(body) == 2 and isinstance(body[0], ast.Assign) and len(body[0].targets) == 1
            and isinstance(body[0].targets[0], ast.Name) and isinstance(body[1], ast.Return)
            and isinstance(body[1].value, ast.Name) and body[1].value.id == body[0].targets[0].id):
        return ast.unparse(body[0].value) == wanted
    return False


def _mlp_activation(module) -> tuple[Optional[str], str]:
    for name in ("gate_proj", "up_proj", "down_proj"):
        if not callable(getattr(module, name, None)):
            return None, f"no {name}"
    if not hasattr(module, "act_fn"):
        return None, "no act_fn"
    if not _standard_gated_forward(type(module)):
        return None, "forward is not down_proj(act_fn(gate_proj(x)) * up_proj(x))"
    kind = _activation_kind(module.act_fn)
    if kind is None:
        return None, f"act_fn {type(module.act_fn).__name__} is neither SiLU nor tanh-GELU"
    return kind, ""


# ----------------------------------------------------------------------------- wiring


def _model_reason(model) -> Optional[str]:
    """Why the model's device/dtype rules fusion out, or None."""
    parameters = list(model.parameters()) if hasattr(model, "parameters") else []
    if not parameters:
        return "the model has no parameters"
    devices = {p.device.type for p in parameters}
    if devices != {"cuda"}:
        return f"parameters on {', '.join(sorted(devices))}, not only CUDA"
    dtypes = {str(p.dtype) for p in parameters if p.is_floating_point()}
    unsupported = sorted(dtypes - set(SUPPORTED_DTYPES))
    if unsupported:
        return f"unsupported parameter dtype {', '.join(unsupported)}"
    return None


def fuse_model_layers(model, settings=None, edits=None, force: bool = False, refused: Optional[str] = None) -> dict:
    """Give recognised RMSNorm, gated-MLP and RoPE attention modules of ``model`` fused forwards; return the counts.

    Every replacement goes through ``edits`` (an :class:`unsloth_patch.edits.Edits`), so
    ``edits.rollback()`` restores the original forwards. Never raises for an unsupported model:
    it records why nothing was fused (see :func:`last_fusion`); ``refused`` is a reason decided
    by the caller (nothing is fused, the reason recorded).
    """
    from .edits import Edits
    from .settings import current

    global _last
    settings = settings if settings is not None else current()
    edits = edits if edits is not None else Edits()
    fused: dict[str, int] = {}
    skipped: dict[str, str] = {}
    reason = ""
    off = tuple(getattr(settings, "kernels_off", ()))
    on = {name: name not in off for name in ("rmsnorm", "swiglu", "rope")}
    if refused:
        reason = refused
    elif getattr(settings, "kernels", "auto") == "off":
        reason = "turned off by UNSLOTH_PATCH_KERNELS=off"
    elif not any(on.values()):
        reason = f"turned off by UNSLOTH_PATCH_KERNELS_OFF={','.join(off)}"
    elif not _triton_available():
        reason = "Triton is not installed"
    elif not force:
        reason = _model_reason(model) or ""
    if reason:
        _last = {"fused": fused, "skipped": skipped, "reason": reason}
        log.logger.info("fused kernels: off (%s)", reason)
        return last_fusion()

    local = Edits()  # ours alone, so an error rolls back only what this function did
    try:
        for name, module in model.named_modules():
            if is_fused(module):
                kind = _fused_kind(module)
                fused[kind] = fused.get(kind, 0) + 1
                continue
            cls = type(module).__name__
            if on["rope"] and rope_fusion.is_candidate(module):
                why = rope_fusion.fuse(module, local)
                if why:
                    skipped[name] = f"{cls}: {why}"
                else:
                    fused["rope"] = fused.get("rope", 0) + 1
            elif on["rmsnorm"] and cls.endswith("RMSNorm"):
                offset, why = _rmsnorm_offset(module)
                if offset is None:
                    skipped[name] = f"{cls}: {why}"
                    continue
                local.setattr(module, "_unsloth_eps", _epsilon(module))
                local.setattr(module, "_unsloth_offset", offset)
                local.setattr(module, "forward", types.MethodType(_rmsnorm_forward, module))
                kind = "rmsnorm_gemma" if offset else "rmsnorm"
                fused[kind] = fused.get(kind, 0) + 1
            elif on["swiglu"] and hasattr(module, "gate_proj") and hasattr(module, "up_proj"):
                activation, why = _mlp_activation(module)
                if activation is None:
                    skipped[name] = f"{cls}: {why}"
                    continue
                local.setattr(module, "_unsloth_activation", activation)
                local.setattr(module, "forward", types.MethodType(_gated_mlp_forward, module))
                kind = "swiglu" if activation == "silu" else "geglu"
                fused[kind] = fused.get(kind, 0) + 1
        if on["swiglu"] and "mlp_recompute" not in off:
            mlp_recompute.mark_last_mlps(model, local, _is_fused_mlp)
    except Exception as exc:  # never break the trainer: keep what was done out, report why
        local.rollback()
        _last = {"fused": {}, "skipped": skipped, "reason": f"error while fusing ({type(exc).__name__}: {exc})"}
        log.once(("fuse-error", type(exc).__name__), logging.WARNING,
                 "fused kernels: skipped after an error (%s); the model runs unchanged", exc)
        return last_fusion()

    edits.call(lambda: None, local.rollback)
    if skipped:
        log.logger.debug("fused kernels: left unchanged: %s",
                         "; ".join(f"{name} ({why})" for name, why in skipped.items()))
    reason = "fused" if fused else "no recognised RMSNorm, gated-MLP or RoPE attention module"
    if off:
        reason += f" (left out by UNSLOTH_PATCH_KERNELS_OFF: {', '.join(off)})"
    _last = {"fused": fused, "skipped": skipped, "reason": reason}
    summary = ", ".join(f"{count} {kind}" for kind, count in sorted(fused.items())) or "nothing"
    log.logger.info("fused kernels: %s%s", summary, f" ({len(skipped)} modules left unchanged)" if skipped else "")
    return last_fusion()
