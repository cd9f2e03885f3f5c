"""``python -m unsloth_patch``: what is installed, which patches applied and why others did not.

``python -m unsloth_patch demo`` runs the stock-vs-patched demo; ``matrix`` prints the
compatibility matrix generated from the patch table.
"""

from __future__ import annotations

import importlib
import platform
import sys


def _version(distribution: str) -> str:
    from .versions import installed

    version = installed(distribution)
    return str(version) if version is not None else "not installed"


def _gpu() -> str:
    try:
        import torch
    except Exception:
        return "unknown (torch not importable)"
    if not torch.cuda.is_available():
        return "none (CPU only)"
    props = torch.cuda.get_device_properties(0)
    return f"{props.name}, {props.total_memory / 2**30:.0f} GiB, capability {props.major}.{props.minor}"


def _here() -> list[str]:
    """What ``auto`` does on this machine with this TRL: the never-slower rule and the packer."""
    lines = []
    try:
        import torch

        from .attention import backends

        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        backend = backends.choose("auto", device, torch.bfloat16, 128)
        if backend == "masked":
            lines.append(f"padding-free under auto: padded batches kept on {device.type} (no varlen attention "
                         "kernel here beats them; UNSLOTH_PATCH_PADDING_FREE=on flattens anyway)")
        else:
            lines.append(f"padding-free under auto: flattened batches on {device} ({backend} varlen attention)")
    except Exception as exc:
        lines.append(f"padding-free under auto: unknown ({type(exc).__name__}: {exc})")
    try:
        from trl import SFTConfig

        from .patches.trainer_facts import boundary_packer

        if boundary_packer(SFTConfig):
            lines.append("packing (packing=True or UNSLOTH_PATCH_PACKING=on): TRL's own packer, which keeps "
                         "examples apart; boundaries added for the varlen attention")
        else:
            lines.append("packing (packing=True or UNSLOTH_PATCH_PACKING=on): this TRL concatenates examples, so "
                         "unsloth_patch packs them whole instead (best-fit decreasing, each its own sequence)")
    except Exception as exc:
        lines.append(f"packing: unknown ({type(exc).__name__}: {exc})")
    from .plan import last_plan

    plan = last_plan()
    if plan is not None:
        lines.append(f"last trainer: padding-free {'on' if plan.padding_free else 'off'} ({plan.padding_free_reason})")
        if plan.packer:
            efficiency = "" if plan.packing_efficiency is None else f", rows {100 * plan.packing_efficiency:.1f}% full"
            lines.append(f"last trainer: packed by {plan.packer}{efficiency}")
    from .layers import last_fusion

    fusion = last_fusion()
    if fusion["reason"] != "not run yet":
        kinds = ", ".join(f"{count} {kind}" for kind, count in sorted(fusion["fused"].items())) or "nothing"
        left = f"; {len(fusion['skipped'])} modules left unchanged" if fusion["skipped"] else ""
        lines.append(f"last train(): fused kernels: {kinds} ({fusion['reason']}{left})")
    from .lora_inputs import last as last_lora

    lora = last_lora()
    if lora["reason"] != "not run yet" and (lora["edited"] or lora["kept"]):
        kept = f"; {len(lora['kept'])} keep PEFT's cast" if lora["kept"] else ""
        lines.append(f"last train(): LoRA inputs in the compute dtype: {lora['edited']} layers ({lora['reason']}{kept})")
    from .lora_fusion import last as last_lora_fusion

    fusion = last_lora_fusion()
    if fusion["reason"] != "not run yet" and (fusion["fused"] or fusion["kept"]):
        kept = f"; {len(fusion['kept'])} left to PEFT" if fusion["kept"] else ""
        lines.append(f"last train(): LoRA layers fused: {fusion['fused']}, {fusion['grouped']} of them in sibling "
                     f"groups ({fusion['reason']}{kept})")
        for name, why in list(fusion["kept"].items())[:3]:
            lines.append(f"  left to PEFT: {name}: {why}")
    from .startup import last

    started = last()
    if started is not None:
        parts = ", ".join(f"{k} {v:.2f} s" for k, v in started["phases"].items()) or "nothing"
        lines.append(f"last train(): start-up of ours {started['ours_s']:.2f} s ({parts}); "
                     f"{started['to_first_step_s']:.2f} s from train() to the first step")
        for name, text in started.get("notes", {}).items():
            lines.append(f"  {name}: {text}")
    return lines


def print_report(out=None) -> int:
    import unsloth_patch
    from . import fallback, registry

    for module in registry.target_modules():  # importing the targets lets the hooks fire
        try:
            importlib.import_module(module)
        except Exception:
            pass
    unsloth_patch.apply()
    out = out or sys.stdout
    write = lambda line="": print(line, file=out)  # noqa: E731
    write(f"unsloth_patch {unsloth_patch.__version__}")
    write(f"python {platform.python_version()}")
    for dist in ("torch", "transformers", "trl", "triton", "peft", "accelerate", "datasets"):
        write(f"{dist} {_version(dist)}")
    write(f"gpu {_gpu()}")
    write()
    write("toggles:")
    for name, value in unsloth_patch.current_settings().as_environment().items():
        write(f"  {name}={value}")
    write()
    write("patches:")
    for rec in unsloth_patch.report():
        status = "applied" if rec.applied else "skipped"
        write(f"  {rec.name:<22} {status:<8} {rec.reason}")
        write(f"  {'':<22} targets: {', '.join(rec.targets)}")
    write()
    write("here:")
    for line in _here():
        write(f"  {line}")
    write()
    write("fallbacks: (parts of ours switched off for the rest of the run after an error)")
    failures = fallback.failures()
    for component, error in failures.items():
        write(f"  {component}: {error}")
    if not failures:
        write("  none")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv else "report"
    if command == "report":
        return print_report()
    if command == "demo":
        from .demo import main as demo_main

        return demo_main(argv)
    if command == "matrix":
        from .matrix import main as matrix_main

        return matrix_main(argv)
    print(f"unknown command {command!r}; use one of: report, demo, matrix", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
