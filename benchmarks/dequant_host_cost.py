"""Host cost of dequantising one bitsandbytes 4-bit weight: bitsandbytes' ``dequantize_4bit`` against
``kernels.projection.dense_weight`` (the double-quantised scales dequantised once and kept), on the CPU.

A 64 x 64 nf4 weight, so small that the time is Python and operator overhead: what the host pays per 4-bit
projection call in a GPU step (7 projections x 22 layers x 2 a step without checkpointing, x 3 with its
recomputation, on the reference model). Both variants give the same weight, bit for bit (checked first).
Interleaved rounds, medians. A CPU is not a GPU host: each removed CUDA launch costs the host more there,
and nothing here measures device time. Writes JSON.

    python benchmarks/dequant_host_cost.py --out result.json [--rounds 30] [--calls 200]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time


def measure(nested: bool, rounds: int, calls: int) -> dict:
    import bitsandbytes as bnb
    import torch
    from bitsandbytes.functional import dequantize_4bit

    from unsloth_patch.kernels import projection

    generator = torch.Generator().manual_seed(3)
    weight = bnb.nn.Params4bit(torch.randn(64, 64, generator=generator).to(torch.bfloat16), requires_grad=False,
                               quant_type="nf4", compress_statistics=nested)
    if getattr(weight, "quant_state", None) is None:
        weight = weight._quantize("cpu")
    state = weight.quant_state
    variants = {"bitsandbytes": lambda: dequantize_4bit(weight.data, state).to(torch.bfloat16),
                "kept scales": lambda: projection.dense_weight(weight.data, state, torch.bfloat16)}
    if not torch.equal(variants["bitsandbytes"](), variants["kept scales"]()):
        raise SystemExit("the two variants dequantise to different weights")
    times: dict = {name: [] for name in variants}
    for _ in range(rounds):
        for name, call in variants.items():
            start = time.perf_counter()
            for _ in range(calls):
                call()
            times[name].append((time.perf_counter() - start) / calls * 1e6)
    return {name: round(statistics.median(values), 2) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    import bitsandbytes
    import torch

    torch.set_num_threads(1)
    result = {"unit": "microseconds per call, median", "rounds": args.rounds, "calls": args.calls,
              "double_quantised": measure(True, args.rounds, args.calls),
              "single_quantised": measure(False, args.rounds, args.calls),
              "versions": {"torch": torch.__version__, "bitsandbytes": bitsandbytes.__version__},
              "machine": platform.processor() or platform.machine()}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
