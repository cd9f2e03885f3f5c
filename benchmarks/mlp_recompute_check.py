"""GPU check of the ``mlp_recompute`` policy against full checkpointing on Llama-shaped layers (bf16 autocast).

For LoRA r=16 on every linear layer and for full fine-tuning of a Llama-1B-shaped model cut to a few
layers, one padding-free batch of ``--tokens`` tokens: the loss and every gradient under
``mlp_recompute`` and ``offload`` (which recomputes the MLPs the same way) against plain full
checkpointing (same fused kernels), the peak memory of a step above what the model held before it,
and the median time of a step. The loss is taken on the decoder's last hidden states (their mean
projection on a fixed random direction), so that the LM head's logits, which TRL's fused head never
materialises, do not hide the layers' memory. Writes JSON.

    python3 benchmarks/mlp_recompute_check.py --out result.json [--layers 4] [--tokens 12288]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def build(adapter: bool, layers: int, seed: int = 0, dtype=torch.bfloat16):
    from unsloth_patch.edits import Edits
    from unsloth_patch.layers import fuse_model_layers
    from unsloth_patch.settings import Settings
    from unsloth_patch.tiny import build_llama_1b_config, model_from_config

    config = build_llama_1b_config(num_hidden_layers=layers)
    model = model_from_config(config, attn_implementation="sdpa", dtype=dtype, seed=seed, device="cuda")
    if adapter:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                                 init_lora_weights=False))
    fused = fuse_model_layers(model, Settings(), Edits())
    base = model.get_base_model() if adapter else model
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.config.use_cache = False
    return model, fused


def batch(tokens: int, vocab: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    lengths, left = [], tokens
    while left > 0:  # real-looking sequences of 300-2048 tokens
        n = min(left, int(torch.randint(300, 2049, (1,), generator=generator)))
        lengths.append(n)
        left -= n
    ids = torch.randint(3, vocab, (1, tokens), generator=generator)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    return {"input_ids": ids.cuda(), "labels": ids.cuda(), "position_ids": positions.cuda()}, lengths


def step(model, inputs, autocast=True):
    for p in model.parameters():
        p.grad = None
    backbone = (model.get_base_model() if hasattr(model, "get_base_model") else model).model
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        hidden = backbone(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"]).last_hidden_state
        direction = torch.randn(hidden.shape[-1], generator=torch.Generator().manual_seed(7)).to(hidden.device)
        loss = (hidden.float() @ direction).mean()
    loss.backward()
    return loss.detach().float().item()


def measure(adapter: bool, policy_name: str, layers: int, tokens: int, repeats: int, precise: bool = False):
    """One configuration; ``precise``: the float32 model without autocast (the reference the bf16 runs are
    compared to), gradients only."""
    from unsloth_patch import checkpointing, mlp_recompute

    model, fused = build(adapter, layers, dtype=torch.float32 if precise else torch.bfloat16)
    if precise:
        model.train()
        inputs, _ = batch(tokens, model.config.vocab_size)
        loss = step(model, inputs, autocast=False)
        grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
        del model
        torch.cuda.empty_cache()
        return {"loss": loss}, grads
    offered = mlp_recompute.available(model)
    if policy_name != "full":
        checkpointing.install(model, policy_name, {})
    model.train()
    inputs, lengths = batch(tokens, model.config.vocab_size)
    step(model, inputs)  # compile and warm up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss = step(model, inputs)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step(model, inputs)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    del model
    torch.cuda.empty_cache()
    return {"loss": loss, "peak_above_model_bytes": peak, "step_s": statistics.median(times), "fused": fused["fused"],
            "offered": list(offered), "lengths": lengths}, grads


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=12288)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    report = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": args.layers,
              "tokens": args.tokens, "date": time.strftime("%Y-%m-%d")}
    for adapter in (True, False):
        name = "lora" if adapter else "full_ft"
        rows = {}
        grads = {}
        for policy_name in ("full", "mlp_recompute", "offload") * 2:  # interleaved, the second round kept
            rows[policy_name], grads[policy_name] = measure(adapter, policy_name, args.layers, args.tokens,
                                                            args.repeats)
        reference = grads["full"]
        report[name] = {f"{p}_{k}": v for p, row in rows.items() for k, v in row.items()}
        precise_row, precise = measure(adapter, "full", args.layers, args.tokens, 0, precise=True)
        report[name]["fp32_loss"] = precise_row["loss"]
        for policy_name in ("full", "mlp_recompute", "offload"):  # each bf16 run's distance to the fp32 gradients
            distance = {k: ((grads[policy_name][k] - precise[k]).norm() / precise[k].norm().clamp_min(1e-30)).item()
                        for k in precise}
            report[name][f"{policy_name}_vs_fp32_grad_relative_l2_median"] = statistics.median(distance.values())
            report[name][f"{policy_name}_vs_fp32_grad_relative_l2_max"] = max(distance.values())
        del precise
        for policy_name in ("mlp_recompute", "offload"):
            ours = grads[policy_name]
            relative = {k: ((ours[k] - reference[k]).norm() / reference[k].norm().clamp_min(1e-30)).item()
                        for k in reference}
            worst = max(relative, key=relative.get)
            report[name].update({
                f"{policy_name}_loss_relative_difference": abs(rows[policy_name]["loss"] - rows["full"]["loss"])
                / abs(rows["full"]["loss"]),
                f"{policy_name}_grad_relative_l2_max": relative[worst], f"{policy_name}_grad_worst": worst,
                f"{policy_name}_grad_relative_l2_median": statistics.median(relative.values()),
                f"{policy_name}_same_gradient_names": sorted(reference) == sorted(ours),
                f"{policy_name}_peak_ratio": rows[policy_name]["peak_above_model_bytes"]
                / rows["full"]["peak_above_model_bytes"],
                f"{policy_name}_speed_ratio": rows["full"]["step_s"] / rows[policy_name]["step_s"],
            })
        offload_vs_mlp = max(((grads["offload"][k] - grads["mlp_recompute"][k]).abs().max().item() for k in reference))
        report[name]["offload_vs_mlp_recompute_max_abs_grad_difference"] = offload_vs_mlp
        print(name, json.dumps({k: v for k, v in report[name].items() if "lengths" not in k}), flush=True)
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
