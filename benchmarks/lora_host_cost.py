"""Host cost of PEFT's LoRA layers against the fused ones, on the CPU: tensors so small that the time is
Python, dispatcher and autograd overhead, the part of a GPU step that the host pays per kernel launch.

A Llama-shaped model with the reference model's 22 layers but hidden size 16 (2 heads, 1 KV head,
intermediate 32), LoRA r=4 on every linear layer, 8 tokens. Three forwards in one process, interleaved,
each timed as the best of 3 forward + backward steps after 2 warm ones: PEFT's (``peft``), every layer
fused (``fused``), and only the sibling groups fused, q/k/v and gate/up, with o and down left to PEFT
(``groups``). Medians over ``--rounds``. A CPU is not a GPU host: the device-side savings of the fused
layers (fewer elementwise kernels over ``[tokens, out]`` and ``[tokens, in]``) do not show here at all,
and a CUDA launch costs the host more than a CPU op's dispatch. Writes JSON.

    python benchmarks/lora_host_cost.py --out result.json [--rounds 30] [--autocast]
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
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--autocast", action="store_true", help="bf16 autocast (float32 adapters, as TRL trains)")
    args = parser.parse_args()
    from peft import LoraConfig, get_peft_model

    from unsloth_patch import lora_fusion
    from unsloth_patch.edits import Edits
    from unsloth_patch.tiny import build_model

    torch.set_num_threads(1)
    base = build_model("llama", hidden_size=16, intermediate_size=32, num_layers=22, num_heads=2, num_kv_heads=1,
                       vocab_size=32, seed=0)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                            init_lora_weights=False))
    ids = torch.randint(0, 32, (1, 8), generator=torch.Generator().manual_seed(0))

    def step() -> float:
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return time.perf_counter() - start

    times: dict = {"peft": [], "fused": [], "groups": []}
    for rep in range(3 * args.rounds):
        name = ("peft", "fused", "groups")[rep % 3]
        edits = Edits()
        if name != "peft":
            lora_fusion.fuse(model, edits)
            if name == "groups":  # the layers without siblings back to PEFT's forward
                for module in model.modules():
                    if lora_fusion.is_fused(module) and lora_fusion.GROUP not in vars(module):
                        edits.setattr(module, "forward", type(module).forward.__get__(module))
        step(), step()
        times[name].append(min(step() for _ in range(3)))
        edits.rollback()
    result = {"machine": platform.machine(), "torch": torch.__version__, "autocast": args.autocast,
              "date": time.strftime("%Y-%m-%d"), **{f"{k}_ms": 1000 * statistics.median(v) for k, v in times.items()}}
    result["fused_vs_peft"] = result["peft_ms"] / result["fused_ms"]
    result["groups_vs_peft"] = result["peft_ms"] / result["groups_ms"]
    print(json.dumps(result, indent=1))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
