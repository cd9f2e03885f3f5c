"""An upper bound of a step's peak without checkpointing, from the model's shape alone.

The probe costs one to two seconds of every run's start-up. On a card with room to spare it can
only confirm what arithmetic already shows: that the fastest policy fits. This module bounds the
no-checkpointing step from above — every tensor the step could keep, counted generously — so that
``none`` can be chosen without a probe when the bound plus the optimizer state is under the budget.
When the bound does not fit, or the model is of a shape whose saved tensors are not known here,
the probe runs as before. Pure arithmetic, no torch.

What a decoder layer keeps per token (``b`` = bytes of an activation element), each counted
higher than HF's modules or ours keep it:

* each RMSNorm: its input and output, in fp32 and in ``b`` (``12 · hidden`` bytes: an eager norm
  upcasts, ours keeps the input and one fp32 scalar);
* attention: q, its rotated copies and the attention output with its transposed copy (``7 · q``),
  k with its rotated copies and v (``4 · kv``), the log-sum-exp (fp32 per head); q/k norms where the
  family has them; attention that keeps O(tokens), never a tokens × tokens matrix;
* the gated MLP: gate, up, the activation and their product (``4 · intermediate``);
* LoRA: the adapters' low-rank activations (``x @ A.T``, the rank per adapted projection, counted
  in float32), and, unless every adapter reads the very tensor its base layer reads (this
  ``train()``'s ``lora_inputs`` edit on every LoRA layer: no dropout, no float32 cast), a copy of
  every adapted input and a one-byte mask (PEFT's cast and dropout).

* bitsandbytes 4-bit weights: their dense copies live only while a projection (or a fused group of
  them) runs, forward or backward; twice the eight largest are counted (``dequant_bytes``). Other
  quantisations (8-bit) are not bounded.

Plus the embedding output and final norm, one more layer's worth as backward workspace, the
logits (``vocab · (2b + 20)`` per token: the logits, their fp32 upcast, log-probabilities, the
gradient in fp32 and ``b``), the gradients, and 10% for allocator rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# families whose decoder layers are the dense Llama layout (norms, q/k/v/o, gated MLP); value: norms per layer
DENSE_FAMILIES = {"llama": 2, "mistral": 2, "qwen2": 2, "qwen3": 2, "gemma": 2, "gemma2": 4}
QK_NORM_FAMILIES = ("qwen3",)
# attention implementations that keep O(tokens) for backward
LINEAR_MEMORY_ATTENTION = ("unsloth_varlen", "flash_attention_2", "flash_attention_3")
ROUNDING = 1.10


@dataclass(frozen=True)
class StepShape:
    """What the bound needs to know about one training step."""

    model_type: str
    attention: str  # the model's attention implementation during training
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tokens: int  # tokens of the largest batch (rows x width when padded)
    activation_bytes: int  # 2 under bf16/fp16 (autocast or half weights), 4 in fp32
    resident_bytes: int  # allocated before the step: weights, buffers, whatever else the process holds
    gradient_bytes: int  # gradients of the trainable parameters
    lora: bool = False
    lora_input_copies: bool = True  # LoRA adapters may keep copies of their inputs (PEFT's cast, dropout)
    lora_rank_bytes: int = 0  # per token, the adapters' low-rank activations summed over every LoRA layer
    quantized: bool = False
    quantization: str = ""  # "4bit": every quantized weight is bitsandbytes 4-bit (bounded); else not bounded
    dequant_bytes: int = 0  # the dense copies of 4-bit weights that can be live at once
    dense_4bit_bytes: int = 0  # every 4-bit weight dense (what keeping them for the run holds: dense_4bit.py)
    experts: int = 0  # > 0: a mixture of experts


def why_not_bounded(shape: StepShape) -> Optional[str]:
    """Why this step's memory cannot be bounded from its shape (None: it can)."""
    if shape.model_type not in DENSE_FAMILIES:
        return f"model type {shape.model_type!r} is not one of the dense layouts bounded here"
    if shape.experts:
        return "a mixture of experts"
    if shape.quantized and shape.quantization != "4bit":
        return "quantized weights other than bitsandbytes 4-bit (their buffers are not modelled)"
    if shape.attention not in LINEAR_MEMORY_ATTENTION:
        return f"attention {shape.attention!r} may keep a tokens x tokens matrix"
    if min(shape.layers, shape.hidden, shape.intermediate, shape.heads, shape.kv_heads, shape.head_dim,
           shape.vocab, shape.tokens, shape.activation_bytes) <= 0:
        return "the model's config lacks a size the bound needs"
    return None


def layer_bytes_per_token(shape: StepShape) -> int:
    """The most one decoder layer keeps for backward per token, without checkpointing."""
    b = shape.activation_bytes
    q = shape.heads * shape.head_dim
    kv = shape.kv_heads * shape.head_dim
    total = DENSE_FAMILIES[shape.model_type] * 12 * shape.hidden
    total += (7 * q + 4 * kv) * b + 4 * shape.heads
    if shape.model_type in QK_NORM_FAMILIES:
        total += 12 * (q + kv)
    total += 4 * shape.intermediate * b
    if shape.lora and shape.lora_input_copies:  # q, k, v, o, gate, up and down's inputs: a copy and a mask each
        total += (b + 1) * (3 * shape.hidden + q + 2 * shape.hidden + shape.intermediate)
    return total


def upper_bound(shape: StepShape) -> Optional[int]:
    """Bytes a no-checkpointing step of ``shape`` stays under (None: not bounded, see ``why_not_bounded``)."""
    if why_not_bounded(shape) is not None:
        return None
    b = shape.activation_bytes
    per_token = (shape.layers + 1) * layer_bytes_per_token(shape)  # + one layer of backward workspace
    per_token += 14 * shape.hidden  # embedding output, final norm
    per_token += shape.vocab * (2 * b + 20)
    per_token += shape.lora_rank_bytes
    dynamic = shape.tokens * per_token + shape.gradient_bytes + shape.dequant_bytes
    return int(shape.resident_bytes + ROUNDING * dynamic)
