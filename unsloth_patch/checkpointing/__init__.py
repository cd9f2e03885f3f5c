"""Activation checkpointing policy: the cheapest one that fits, chosen from a measurement.

TRL (>= 0.24) turns gradient checkpointing on by default. When it is on only because of that
default, the trainer start probes each candidate policy, fastest first, with small training steps
(1, 2, then 4 sequences) extrapolated phase by phase to the largest batch the run can produce, and
keeps the first whose peak memory (plus the optimizer state still to come) fits the budget. Full
checkpointing's smallest steps run first; every step is predicted before it runs and skipped when
it would not fit, and on CUDA the allocator is capped at the budget while the probe runs:

``none``       no checkpointing: every activation is kept.
``mlp_recompute``  plain checkpointing whose gated MLPs keep only their input: chunked, recomputed in
               their own backward, skipped in the layer's recomputation (``mlp_recompute.py``).
``selective``  checkpointed layers keep matmul and attention outputs and recompute the cheap
               elementwise / normalisation work (PyTorch selective activation checkpointing).
               Tried after ``mlp_recompute`` (``PREFERENCE``): measured slower, holding more.
``offload``    plain checkpointing whose saved layer inputs live in pinned host memory (a reused
               pool); the copies run on a side stream, overlapped with compute, the next layer's
               fetched ahead in the backward; MLPs as under ``mlp_recompute``.
``full``       TRL's default: plain checkpointing.

One reason to change per module: ``policy`` (the decision, pure), ``estimate``
(the memory model: a step's peak from smaller steps, pure), ``bound`` (an upper bound of the
no-checkpointing step from the model's shape, which lets a roomy card skip the probe, pure), ``functions`` (the checkpoint functions
the policies install), ``offload`` (offloaded checkpoints' host side: pinned pool, copies, prefetch), ``meter`` (per-phase peaks: live tensor bytes on a CPU, the allocator on
CUDA; the CUDA cap), ``probe`` (one step and what it restores), ``ladder`` (which steps run, each
predicted first), ``mlp_chunk`` (how many tokens a chunked MLP takes at once, from the room left under
the budget, pure), ``dense_4bit`` (whether a QLoRA run keeps its 4-bit weights dense, from the room the
bound leaves, pure), ``per_batch`` (what each batch runs inside the chosen policy's budget: a larger MLP
chunk, a faster candidate, layers left unchecked; pure). ``patches/checkpointing.py`` wires it into
``Trainer.train``, ``patches/per_batch.py`` into each training step.
"""

from .functions import (CHECKPOINT_FUNCTIONS, OFFLOAD_MIN_BYTES, PerBatch, checkpoint_function, checkpoint_offload,
                        checkpoint_selective, install, layer_of, restore_checkpointing, selective_available, selective_context,
                        snapshot_checkpointing)
from .bound import StepShape, upper_bound, why_not_bounded
from .estimate import Step, extrapolate, peak_at, step_sizes
from .meter import CudaBytes, LiveBytes, boundary, memory_cap
from .policy import (GIB, POLICIES, PREFERENCE, SAFETY_MARGIN, Decision, ProbeOutOfMemory, agree, agree_across_ranks, budget_for,
                     choose, fits, is_out_of_memory, last_decision, oom_types, optimizer_state_bytes, remember)
from ..gc_freeze import quick_collections
from .probe import (ProbeBatch, RestorePoint, autocast_for, blocks, floor_bytes, make_batch, measure, model_loss,
                    predicted_peak, release, run_probe)
from .ladder import Ladder

_LiveBytes = LiveBytes  # the name the tests and benchmarks knew

__all__ = [
    "CHECKPOINT_FUNCTIONS", "OFFLOAD_MIN_BYTES", "PerBatch", "layer_of", "blocks", "checkpoint_function", "checkpoint_offload", "checkpoint_selective",
    "install", "restore_checkpointing", "selective_available", "selective_context", "snapshot_checkpointing",
    "StepShape", "upper_bound", "why_not_bounded",
    "Step", "extrapolate", "step_sizes", "CudaBytes", "LiveBytes", "boundary", "memory_cap", "GIB", "POLICIES",
    "PREFERENCE", "SAFETY_MARGIN", "Decision", "ProbeOutOfMemory", "agree", "agree_across_ranks", "budget_for", "choose", "fits",
    "is_out_of_memory", "last_decision", "oom_types", "optimizer_state_bytes", "remember", "ProbeBatch",
    "RestorePoint", "autocast_for", "floor_bytes", "make_batch", "measure", "model_loss", "predicted_peak",
    "quick_collections", "release", "run_probe", "Ladder",
]
