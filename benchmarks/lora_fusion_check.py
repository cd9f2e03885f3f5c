"""GPU check of the fused LoRA layers (``unsloth_patch/lora_fusion.py``) against PEFT's own, bf16 autocast.

A Llama-1B-shaped model cut to ``--layers`` layers, LoRA r=16 on every linear layer (random adapters),
one padding-free batch of ``--tokens`` tokens, fused RMSNorm/MLP/RoPE kernels on in both runs. For
PEFT's forwards and ours: the loss and every adapter gradient against a float32 run of the same
model (relative L2 distance), and the median step time (forward + backward) with the kernel launch
count of one step. Writes JSON.

``--quant nf4`` puts the base weights in bitsandbytes nf4 (double quantisation, as QLoRA loads them) and
adds a bit-exactness check: every base weight as the fused node dequantises it against bitsandbytes'
own ``dequantize_4bit``, and each 4-bit layer's base output (its ``Linear4bit`` forward) against
``F.linear`` with that weight. The float32 reference is then the same model with the dequantised
weights in float32.

    python3 benchmarks/lora_fusion_check.py --out result.json [--layers 4] [--tokens 5400] [--quant nf4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def build(layers: int, dtype, quant=None):
    from peft import LoraConfig, get_peft_model

    from unsloth_patch.tiny import build_llama_1b_config, model_from_config

    config = build_llama_1b_config(num_hidden_layers=layers)
    model = model_from_config(config, attn_implementation="sdpa", dtype=dtype, seed=0, device="cuda")
    if quant == "nf4":
        quantize_nf4(model, dtype)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                             init_lora_weights=False))
    model.config.use_cache = False
    return model


def quantize_nf4(module, compute_dtype) -> None:
    """Every linear layer but the head as bitsandbytes' nf4 ``Linear4bit`` (double quantisation)."""
    import bitsandbytes as bnb

    for name, child in list(module.named_children()):
        if type(child) is torch.nn.Linear and name != "lm_head":
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True)
            layer.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4",
                                             compress_statistics=True)
            setattr(module, name, layer.cuda())  # quantised as it moves to the GPU, as transformers loads it
        else:
            quantize_nf4(child, compute_dtype)
    module.is_loaded_in_4bit = True  # PEFT then wraps the layers in its 4-bit LoRA layers


def dequantised_copy(model):
    """A float32 PEFT model with the 4-bit base weights dequantised (the reference of a QLoRA run)."""
    import copy

    from bitsandbytes.functional import dequantize_4bit

    reference = copy.deepcopy(model)
    import bitsandbytes as bnb

    for parent in list(reference.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):  # the base layers (PEFT's LoRA wrapper shares the name)
                dense = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                        device="cuda", dtype=torch.float32)
                with torch.no_grad():
                    dense.weight.copy_(dequantize_4bit(child.weight, child.weight.quant_state).float())
                dense.weight.requires_grad_(False)
                setattr(parent, name, dense)
    return reference.float()


def nf4_exactness(model) -> dict:
    """Per 4-bit layer: the fused node's dense weight against ``dequantize_4bit``, and the layer's own base
    output against ``F.linear`` with that weight (bitwise, on a batch of training size)."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    from unsloth_patch.kernels.projection import dense_weight

    layers = weights_equal = outputs_equal = 0
    generator = torch.Generator(device="cuda").manual_seed(3)
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        layers += 1
        state = module.weight.quant_state
        dense = dense_weight(module.weight, state, torch.bfloat16)
        weights_equal += torch.equal(dense, dequantize_4bit(module.weight, state).to(torch.bfloat16))
        x = torch.randn(512, module.in_features, device="cuda", dtype=torch.bfloat16, generator=generator)
        with torch.no_grad():
            outputs_equal += torch.equal(module(x), torch.nn.functional.linear(x, dense, module.bias))
    return {"layers": layers, "weights_bit_equal": weights_equal, "base_outputs_bit_equal": outputs_equal}


def batch(tokens: int, vocab: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    lengths, left = [], tokens
    while left > 0:
        n = min(left, int(torch.randint(100, 1200, (1,), generator=generator)))
        lengths.append(n)
        left -= n
    ids = torch.randint(3, vocab, (1, tokens), generator=generator)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    return {"input_ids": ids.cuda(), "labels": ids.cuda(), "position_ids": positions.cuda()}


def step(model, inputs, autocast: bool):
    for p in model.parameters():
        p.grad = None
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        loss = model(**inputs).loss
    loss.backward()
    return loss.detach().float().item(), {n: p.grad.float().clone() for n, p in model.named_parameters()
                                          if p.grad is not None}


def distance(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def timed(model, inputs, repeats: int) -> dict:
    for _ in range(3):
        step(model, inputs, True)
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for p in model.parameters():
            p.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(**inputs).loss.backward()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(**inputs).loss.backward()
        torch.cuda.synchronize()
    launches = sum(e.count for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA)
    return {"step_ms": 1000 * statistics.median(times), "launches": launches}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=5400)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--quant", choices=["nf4"], default=None)
    args = parser.parse_args()
    from unsloth_patch import lora_fusion
    from unsloth_patch.edits import Edits
    from unsloth_patch.layers import fuse_model_layers
    from unsloth_patch.settings import Settings

    model = build(args.layers, torch.bfloat16, args.quant)
    if args.quant:
        exactness = nf4_exactness(model)
        reference = dequantised_copy(model)
    else:
        exactness = None
        reference = build(args.layers, torch.float32)
        reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    inputs = batch(args.tokens, model.config.vocab_size)
    ref_loss, ref_grads = step(reference, inputs, autocast=False)
    del reference
    fuse_model_layers(model, Settings(), Edits())
    result = {"card": torch.cuda.get_device_name(0), "torch": torch.__version__, "layers": args.layers,
              "tokens": args.tokens, "date": time.strftime("%Y-%m-%d"), "reference_loss": ref_loss,
              "quant": args.quant, "nf4_exactness": exactness}
    for name in ("peft", "fused"):
        edits = Edits()
        if name == "fused":
            result["fusion"] = {k: v for k, v in lora_fusion.fuse(model, edits).items() if k != "kept"}
        loss, grads = step(model, inputs, autocast=True)
        distances = sorted(distance(grads[k], ref_grads[k]) for k in ref_grads)
        result[name] = {"loss": loss, "loss_rel_error": abs(loss - ref_loss) / abs(ref_loss),
                        "grad_rel_l2_median": statistics.median(distances), "grad_rel_l2_max": distances[-1],
                        **timed(model, inputs, args.repeats)}
        edits.rollback()
    result["speedup"] = result["peft"]["step_ms"] / result["fused"]["step_ms"]
    print(json.dumps(result, indent=1))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
