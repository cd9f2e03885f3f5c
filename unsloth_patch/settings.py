"""Environment toggles, read once at activation into one frozen object.

Every toggle is an environment variable prefixed ``UNSLOTH_PATCH_``. A bad value is a
user error that would otherwise silently change training, so it raises a ``ValueError``
that names the variable, the value and what is accepted.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, fields
from typing import Callable, Mapping, Optional

PREFIX = "UNSLOTH_PATCH_"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _choice(*choices: str) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise _invalid(name, raw, "one of " + ", ".join(choices))
        return value

    parse.accepted = " | ".join(choices)  # type: ignore[attr-defined]
    return parse


def _boolean(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise _invalid(name, raw, "1/0, true/false, yes/no, on/off (any case)")


_boolean.accepted = "1 | 0 | true | false | yes | no | on | off"  # type: ignore[attr-defined]


_NUMBER = re.compile(r"[+]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _positive_number(example: str, unit: str = "") -> Callable[[str, str], float]:
    """A positive finite decimal number, written plainly (no ``_`` separators, no nan/inf)."""
    accepted = f"a positive number{unit}, such as {example}"

    def parse(name: str, raw: str) -> float:
        text = raw.strip()
        if not _NUMBER.fullmatch(text):
            raise _invalid(name, raw, accepted)
        value = float(text)
        if math.isinf(value) or value <= 0:
            raise _invalid(name, raw, accepted)
        return value

    parse.accepted = accepted  # type: ignore[attr-defined]
    return parse


def triton_interpreting(environ=None) -> bool:
    """Whether Triton runs its CPU interpreter (``TRITON_INTERPRET`` set to anything but empty or 0)."""
    environ = os.environ if environ is None else environ
    return environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# what UNSLOTH_PATCH_KERNELS_OFF can name: each switches off one fused layer kernel (lora_cast: LoRA
# layers keeping their input in the compute dtype under autocast, ``lora_inputs``; lora: LoRA layers as
# one autograd node, ``lora_fusion``)
KERNEL_NAMES = ("rmsnorm", "swiglu", "rope", "lora_cast", "mlp_recompute", "lora", "mlp_chunk")


def _kernel_names(name: str, raw: str) -> tuple:
    """A comma-separated list of kernel names (any case, spaces allowed), kept in KERNEL_NAMES order."""
    accepted = ("a comma-separated list of " + ", ".join(KERNEL_NAMES)
                + " (swiglu: the gated MLP, SwiGLU and GeGLU; lora_cast: PEFT's float32 copies of LoRA inputs kept; "
                + "lora: PEFT's own LoRA layer forwards)")
    items = [item.strip().lower() for item in raw.split(",")]
    unknown = [item for item in items if item not in KERNEL_NAMES]
    if unknown or not items:
        raise _invalid(name, raw, accepted)
    return tuple(k for k in KERNEL_NAMES if k in items)


_kernel_names.accepted = " | ".join(KERNEL_NAMES) + ", comma-separated"  # type: ignore[attr-defined]


def _invalid(name: str, raw: str, accepted: str) -> ValueError:
    return ValueError(f"{PREFIX}{name}={raw!r} is not valid; accepted values: {accepted}.")


@dataclass(frozen=True)
class Toggle:
    """One environment toggle: its variable suffix, default, parser and meaning."""

    name: str
    default: object
    parse: Callable[[str, str], object]
    help: str

    @property
    def variable(self) -> str:
        return PREFIX + self.name

    @property
    def accepted(self) -> str:
        return getattr(self.parse, "accepted", "")


TOGGLES: tuple[Toggle, ...] = (
    Toggle("DISABLE", False, _boolean, "Import does nothing except record that the plugin is disabled."),
    Toggle("PADDING_FREE", "auto", _choice("auto", "on", "off"),
           "Padding-free batches: auto when safe, on = required (error if impossible), off = untouched."),
    Toggle("ATTENTION", "auto", _choice("auto", "triton", "torch", "off"),
           "Attention for padding-free batches: auto picks Triton on supported GPUs, then torch varlen_attn, "
           "then a boundary-correct masked path."),
    Toggle("PACKING", "off", _choice("off", "on"),
           "Sample packing: off = as the config says (packing=True still packs), on = pack even where "
           "packing=False; packing is always boundary-aware (examples never attend to each other)."),
    Toggle("EMBEDDING_LR", None, _positive_number("5e-5"),
           "Learning rate for the input/output embeddings (lowest precedence after the config field)."),
    Toggle("KERNELS", "auto", _choice("auto", "off"), "Fused kernels for the model's layers."),
    Toggle("KERNELS_OFF", (), _kernel_names,
           "Fused layer kernels to leave out while KERNELS=auto: any of rmsnorm, swiglu, rope, lora_cast, "
           "mlp_recompute, lora, mlp_chunk, comma-separated."),
    Toggle("COMPAT", "auto", _choice("auto", "off"),
           "Translate SFTTrainer arguments written for other TRL versions."),
    Toggle("CHECKPOINTING", "auto", _choice("auto", "uniform", "off"),
           "Replace TRL's default gradient checkpointing by the cheapest policy that fits the card: auto = and let "
           "each smaller batch spend the room it leaves (larger MLP chunks, a faster policy, layers unchecked); "
           "uniform = every batch as the worst one; off = TRL's checkpointing as configured."),
    Toggle("MEMORY_BUDGET_GB", None, _positive_number("24 or 7.5", " of GiB"),
           "Memory budget (GiB) used instead of the card's memory when choosing a checkpointing policy."),
    Toggle("DENSE_4BIT", "auto", _choice("auto", "off"),
           "QLoRA: auto = keep each 4-bit weight dense for the run (dequantised once, the 16-bit weights' size "
           "held) where the step's upper bound leaves room for the copies under the budget; off = dequantise on "
           "every call."),
    Toggle("MATMUL_4BIT", "bitsandbytes", _choice("bitsandbytes", "fused"),
           "QLoRA, 4-bit weights not kept dense: bitsandbytes = dequantise each into a 16-bit temporary for cuBLAS "
           "(default); fused = our Triton kernels dequantise tiles inside the matmul (no 16-bit copy, bit-exact, but "
           "measured 15-32x slower per projection on an H100: for experiments, not for training)."),
    Toggle("LOG_LEVEL", "warning", _choice("debug", "info", "warning", "error"), "Level of the plugin's log."),
)


@dataclass(frozen=True)
class Settings:
    """The toggles in force for this process."""

    disable: bool = False
    padding_free: str = "auto"
    attention: str = "auto"
    packing: str = "off"
    embedding_lr: Optional[float] = None
    kernels: str = "auto"
    kernels_off: tuple = ()
    compat: str = "auto"
    checkpointing: str = "auto"
    memory_budget_gb: Optional[float] = None
    dense_4bit: str = "auto"
    matmul_4bit: str = "bitsandbytes"
    log_level: str = "warning"

    def kernel_on(self, name: str) -> bool:
        """Whether the fused layer kernel ``name`` (one of KERNEL_NAMES) may be used."""
        return self.kernels != "off" and name not in self.kernels_off

    def as_environment(self) -> dict[str, str]:
        """The settings spelled as the variables a user would set (for the report)."""
        out = {}
        for toggle in TOGGLES:
            value = getattr(self, toggle.name.lower())
            if isinstance(value, tuple):
                value = ",".join(value) or None
            out[toggle.variable] = "unset" if value is None else str(value).lower()
        return out


# Variables with the prefix that configure tooling (nox, benchmarks), not the plugin.
NON_TOGGLE_VARIABLES = ("UNSLOTH_PATCH_TORCH_SPEC", "UNSLOTH_PATCH_TORCH_INDEX_URL", "UNSLOTH_PATCH_DEMO_CHILD")

assert {t.name.lower() for t in TOGGLES} == {f.name for f in fields(Settings)}


def read_settings(environ: Optional[Mapping[str, str]] = None) -> Settings:
    """Parse every ``UNSLOTH_PATCH_*`` toggle; raise ``ValueError`` on the first bad one.

    An empty value (``UNSLOTH_PATCH_DISABLE=""``) is an error too: unset the variable instead.
    """
    environ = os.environ if environ is None else environ
    values = {}
    for toggle in TOGGLES:
        raw = environ.get(toggle.variable)
        if raw is None:
            values[toggle.name.lower()] = toggle.default
        elif raw.strip() == "":
            # an empty value is a mistake more often than a wish for the default: say so
            raise _invalid(toggle.name, raw, f"{toggle.accepted}; unset the variable for the default")
        else:
            values[toggle.name.lower()] = toggle.parse(toggle.name, raw)
    return Settings(**values)


def unknown_variables(environ: Optional[Mapping[str, str]] = None) -> list[str]:
    """``UNSLOTH_PATCH_*`` variables that are not toggles (likely typos; warned about, not fatal)."""
    environ = os.environ if environ is None else environ
    known = {t.variable for t in TOGGLES} | set(NON_TOGGLE_VARIABLES)
    return sorted(k for k in environ if k.startswith(PREFIX) and k not in known)


_current: Optional[Settings] = None


def current() -> Settings:
    """The settings read at activation (read now if activation has not happened)."""
    global _current
    if _current is None:
        _current = read_settings()
    return _current


def set_current(settings: Settings) -> None:
    global _current
    _current = settings
