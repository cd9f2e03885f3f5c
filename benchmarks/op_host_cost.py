"""Host cost of our kernels' custom-op calls against direct calls (``kernels/_eager.py``), on the CPU.

Tensors so small that the time is Python, dispatcher and autograd overhead, the part of a GPU step that
the host pays around each kernel launch. The Triton launches are replaced by the kernels' PyTorch
references (the same in both variants), so what differs is only how a call reaches its body: through
the ``torch.library`` op (``op``: dispatcher, the op's autograd wrapper, a redispatch) or directly
(``direct``: a plain ``autograd.Function``; what eager training uses since this change).

Two measurements, interleaved, medians over ``--rounds``:

* ``per_call``: forward + backward of one call of each kernel (RoPE, RMSNorm, gated activation, varlen
  attention), µs;
* ``model``: forward + backward of a Llama-shaped model with the reference model's 22 layers (hidden 16)
  whose RMSNorm, gated MLP and RoPE run on our kernels, ms.

A CPU is not a GPU host: a CUDA launch costs the host more than a CPU op, and nothing here measures
device time. Writes JSON.

    python benchmarks/op_host_cost.py --out result.json [--rounds 30]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import time

import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU tensors pass the kernels' device checks (launches are replaced)


def _references():
    from unsloth_patch import layers, rope_fusion
    from unsloth_patch.kernels import rmsnorm, rope, swiglu

    varlen_attention = importlib.import_module("unsloth_patch.kernels.varlen_attention")

    for module in (rmsnorm, rope, swiglu):
        module._forward_triton = module._forward_reference
        module._backward_triton = module._backward_reference
    varlen_attention._forward = varlen_attention._forward_reference
    varlen_attention._backward = varlen_attention._backward_reference
    rope_fusion._kernel_available = lambda: True
    layers._triton_available = lambda: True


def _calls():
    from unsloth_patch.kernels import rmsnorm, rope, swiglu, varlen_attention

    g = torch.Generator().manual_seed(0)

    def leaf(*shape):
        return torch.randn(*shape, generator=g).requires_grad_()

    q, k = leaf(1, 2, 8, 8), leaf(1, 1, 8, 8)
    cos, sin = torch.randn(1, 8, 8, generator=g), torch.randn(1, 8, 8, generator=g)
    x, w = leaf(8, 16), leaf(16)
    gate, up = leaf(8, 32), leaf(8, 32)
    aq, ak, av = leaf(8, 2, 64), leaf(8, 1, 64), leaf(8, 1, 64)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    return {
        "rope": lambda: sum(t.sum() for t in rope.rope(q, k, cos, sin)),
        "rms_norm": lambda: rmsnorm.rms_norm(x, w, 1e-6).sum(),
        "gated_activation": lambda: swiglu.swiglu(gate, up).sum(),
        "varlen_attention": lambda: varlen_attention(aq, ak, av, cu, 5).sum(),
    }


def _model():
    from unsloth_patch import layers
    from unsloth_patch.edits import Edits
    from unsloth_patch.settings import Settings
    from unsloth_patch.tiny import build_model

    model = build_model("llama", hidden_size=16, intermediate_size=32, num_layers=22, num_heads=2, num_kv_heads=1,
                        vocab_size=32, seed=0)
    report = layers.fuse_model_layers(model, Settings(), Edits(), force=True)
    ids = torch.randint(0, 32, (1, 8), generator=torch.Generator().manual_seed(1))
    return (lambda: model(input_ids=ids, labels=ids).loss), report["fused"]


def _time(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn().backward()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    from unsloth_patch.kernels import _eager

    torch.set_num_threads(1)
    _references()
    calls = _calls()
    model_step, fused = _model()
    samples = {variant: {name: [] for name in [*calls, "model"]} for variant in ("op", "direct")}
    for _ in range(args.rounds):
        for variant in ("op", "direct"):
            _eager.DIRECT = variant == "direct"
            for name, fn in calls.items():
                _time(fn, 3)
                samples[variant][name].append(_time(fn, 20) * 1e6)
            _time(model_step, 2)
            samples[variant]["model"].append(_time(model_step, 3) * 1e3)
    _eager.DIRECT = True
    medians = {v: {n: round(statistics.median(s), 1 if n != "model" else 2) for n, s in by.items()}
               for v, by in samples.items()}
    result = {
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__, "rounds": args.rounds,
        "fused_in_model": fused,
        "per_call_us_fwd_bwd": {n: {v: medians[v][n] for v in medians} for n in calls},
        "model_ms_fwd_bwd": {v: medians[v]["model"] for v in medians},
        "model_direct_over_op": round(medians["op"]["model"] / medians["direct"]["model"], 3),
    }
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
