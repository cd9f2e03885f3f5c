"""Host cost of PEFT's LoRA layers against the fused ones, on the CPU: tiny tensors, so the time is Python,
dispatcher and autograd overhead, the part that paces a GPU step the host cannot keep fed.

A Llama-shaped model with the reference model's layer count (22) but hidden size 64, LoRA r=16 on every
linear layer, 32 tokens, bf16 autocast: the median time of a forward + backward with PEFT's forwards and
with ``lora_fusion``'s, in one process, interleaved. Writes JSON.

    python benchmarks/lora_host_cost.py --out result.json [--repeats 30]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--layers", type=int, default=22)
    args = parser.parse_args()
    from peft import LoraConfig, get_peft_model

    from unsloth_patch import lora_fusion
    from unsloth_patch.edits import Edits
    from unsloth_patch.tiny import build_model

    torch.set_num_threads(1)
    base = build_model("llama", hidden_size=64, intermediate_size=128, num_layers=args.layers, vocab_size=128, seed=0)
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                            init_lora_weights=False))
    ids = torch.randint(0, 128, (1, 32), generator=torch.Generator().manual_seed(0))

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids, labels=ids).loss.backward()

    times = {"peft": [], "fused": []}
    edits = None
    for _ in range(3):
        step()
    for rep in range(2 * args.repeats):
        name = "peft" if rep % 2 == 0 else "fused"
        if name == "fused":
            edits = Edits()
            lora_fusion.fuse(model, edits)
        for _ in range(2):
            step()  # warm
        start = time.perf_counter()
        step()
        times[name].append(time.perf_counter() - start)
        if edits is not None:
            edits.rollback()
            edits = None
    result = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "layers": args.layers, "date": time.strftime("%Y-%m-%d"),
              **{f"{k}_ms": 1000 * statistics.median(v) for k, v in times.items()}}
    result["saved_ms_per_layer"] = (result["peft_ms"] - result["fused_ms"]) / args.layers
    print(json.dumps(result, indent=1))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
