"""The 4-bit matmul kernels (``unsloth_patch/kernels/linear_4bit.py``) on a GPU: exactness and time.

``--check``: the weight our tiles dequantise against bitsandbytes' CUDA dequantisation, bit for bit, in bf16 and
fp16, nf4 and fp4, with and without double quantisation, for the reference model's projection shapes; and the
relative error of the forward and the input gradient against cuBLAS on bitsandbytes' weight.

Default: times per projection (``triton.testing.do_bench``, medians, ms) at ``--tokens`` rows, bf16, nf4 with
double quantisation (QLoRA's default), for the 1.1B reference model's shapes and Llama-3.1-8B's:

* ``dense``: cuBLAS on a 16-bit weight (what a weight kept dense costs: the floor);
* ``bitsandbytes``: bitsandbytes' dequantisation into a temporary, then cuBLAS (the default where no copy is kept);
* ``fused``: our kernels.

Forward ``x @ W.T`` and input gradient ``dy @ W`` each. Writes JSON.

    python benchmarks/linear_4bit.py --check --out check.json
    python benchmarks/linear_4bit.py --out time.json [--tokens 5400]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from unsloth_patch.kernels import linear_4bit, projection  # noqa: E402
from unsloth_patch.kernels.projection import _absmax  # noqa: E402

DEVICE = "cuda"  # a CPU smoke run of this script sets "cpu" (Triton's interpreter, small shapes)
SHAPES = {  # name: (out, in)
    "1.1B q/o": (2048, 2048), "1.1B k/v": (256, 2048), "1.1B gate/up": (5632, 2048), "1.1B down": (2048, 5632),
    "8B q/o": (4096, 4096), "8B k/v": (1024, 4096), "8B gate/up": (14336, 4096), "8B down": (4096, 14336),
}


def _quantized(shape, quant_type, nested, dtype, seed=0):
    from bitsandbytes import functional

    g = torch.Generator(device=DEVICE).manual_seed(seed)
    weight = torch.randn(*shape, device=DEVICE, generator=g).mul_(0.02).to(dtype)
    return functional.quantize_4bit(weight, blocksize=64, quant_type=quant_type, compress_statistics=nested)


def check() -> dict:
    from bitsandbytes import functional

    rows = []
    for name, shape in SHAPES.items():
        for dtype in (torch.bfloat16, torch.float16):
            for quant_type in ("nf4", "fp4"):
                for nested in (False, True):
                    packed, state = _quantized(shape, quant_type, nested, dtype)
                    theirs = functional.dequantize_4bit(packed, state)
                    ours = linear_4bit.dequantize_4bit(packed, _absmax(state), quant_type, 64, state.shape, dtype)
                    row = {"shape": name, "dtype": str(dtype), "quant_type": quant_type, "nested": nested,
                           "bit_exact": bool(torch.equal(ours.view(torch.int16), theirs.view(torch.int16))),
                           "differing_values": int((ours.view(torch.int16) != theirs.view(torch.int16)).sum())}
                    if quant_type == "nf4" and nested:
                        x = torch.randn(1000, shape[1], device=DEVICE, dtype=dtype)
                        dy = torch.randn(1000, shape[0], device=DEVICE, dtype=dtype)
                        y = linear_4bit.linear_4bit(x, packed, _absmax(state), quant_type, 64, state.shape)
                        dx = linear_4bit.linear_4bit_dx(dy, packed, _absmax(state), quant_type, 64, state.shape)
                        w = theirs.double()
                        y_ref, dx_ref = x.double() @ w.t(), dy.double() @ w
                        cublas_y, cublas_dx = (x @ theirs.t()).double(), (dy @ theirs).double()
                        row.update({
                            "forward_rel_error": ((y.double() - y_ref).norm() / y_ref.norm()).item(),
                            "input_grad_rel_error": ((dx.double() - dx_ref).norm() / dx_ref.norm()).item(),
                            "cublas_forward_rel_error": ((cublas_y - y_ref).norm() / y_ref.norm()).item(),
                            "cublas_input_grad_rel_error": ((cublas_dx - dx_ref).norm() / dx_ref.norm()).item(),
                        })
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    return {"rows": rows, "all_bit_exact": all(r["bit_exact"] for r in rows)}


def timings(tokens: int) -> dict:
    from triton.testing import do_bench

    dtype = torch.bfloat16
    rows = []
    for name, (out_features, in_features) in SHAPES.items():
        packed, state = _quantized((out_features, in_features), "nf4", True, dtype)
        absmax = _absmax(state)  # the kept float32 scales, as a training step has them
        dense = projection.dense_weight(packed, state, dtype)
        x = torch.randn(tokens, in_features, device=DEVICE, dtype=dtype)
        dy = torch.randn(tokens, out_features, device=DEVICE, dtype=dtype)
        bench = {
            "forward dense": lambda: x @ dense.t(),
            "forward bitsandbytes": lambda: x @ projection.dense_weight(packed, state, dtype).t(),
            "forward fused": lambda: linear_4bit.linear_4bit(x, packed, absmax, "nf4", 64, state.shape),
            "input grad dense": lambda: dy @ dense,
            "input grad bitsandbytes": lambda: dy @ projection.dense_weight(packed, state, dtype),
            "input grad fused": lambda: linear_4bit.linear_4bit_dx(dy, packed, absmax, "nf4", 64, state.shape),
        }
        row = {"shape": name, "out": out_features, "in": in_features, "tokens": tokens}
        for label, fn in bench.items():
            fn()
            row[label + " ms"] = round(do_bench(fn, warmup=10, rep=50), 4)
        row["forward fused / bitsandbytes"] = round(row["forward fused ms"] / row["forward bitsandbytes ms"], 3)
        row["input grad fused / bitsandbytes"] = round(row["input grad fused ms"] / row["input grad bitsandbytes ms"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"rows": rows, "tiles": linear_4bit.GPU_TILES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--tokens", type=int, default=5400)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/linear_4bit.py needs a CUDA GPU")
    result = {"card": torch.cuda.get_device_name(), "torch": torch.__version__}
    result.update(check() if args.check else timings(args.tokens))
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
