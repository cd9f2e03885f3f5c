"""The kernels as ``torch.library`` custom ops: opcheck, torch.compile, and a failing launch.

A Triton launch that raises (forward or backward) makes the op compute the same maths in
PyTorch for the rest of the run, with one warning. Runs under the Triton interpreter on a CPU.
"""

from __future__ import annotations

import importlib
import logging
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from unsloth_patch.kernels import rmsnorm, rope, swiglu  # noqa: E402

from .helpers import fresh_fallbacks, plugin_log  # noqa: E402,F401

va = importlib.import_module("unsloth_patch.kernels.varlen_attention")
pytestmark = pytest.mark.kernels
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float32


def _leaf(*shape, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator).to(DEVICE, DTYPE).requires_grad_()


def _attention_inputs():
    lengths = (5, 17, 1, 9)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    total = sum(lengths)
    return _leaf(total, 4, 64, seed=1), _leaf(total, 2, 64, seed=2), _leaf(total, 2, 64, seed=3), cu, max(lengths)


def attention(q, k, v, cu, longest):
    return va.varlen_attention(q, k, v, cu, longest, window=7, softcap=20.0)


def norm(x, w):
    return rmsnorm.rms_norm(x, w, 1e-6, 0.0)


def gated(g, u):
    return swiglu.gated_activation(g, u, "silu")


def rotary(q, k, cos, sin):
    q_out, k_out = rope.rope(q, k, cos, sin)
    return torch.cat((q_out.flatten(), k_out.flatten()))


def _rope_inputs():
    q = _leaf(2, 6, 4, 16, seed=8).detach().transpose(1, 2).requires_grad_()  # transformers' layout
    k = _leaf(2, 6, 2, 16, seed=9).detach().transpose(1, 2).requires_grad_()
    return q, k, _leaf(1, 6, 16, seed=10).detach(), _leaf(1, 6, 16, seed=11).detach()


CASES = {
    "attention": (attention, _attention_inputs, va),
    "rmsnorm": (norm, lambda: (_leaf(9, 96, seed=4), torch.nn.Parameter(_leaf(96, seed=5).detach())), rmsnorm),
    "gated": (gated, lambda: (_leaf(7, 130, seed=6), _leaf(7, 130, seed=7)), swiglu),
    "rope": (rotary, _rope_inputs, rope),
}


def _run(function, inputs):
    out = function(*inputs)
    out.backward(torch.ones_like(out) * 0.5)
    return out.detach(), [t.grad.clone() for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("where", ["forward", "backward"])
def test_a_failing_launch_falls_back_to_the_reference_once_warned(name, where, monkeypatch, caplog):
    function, make, module = CASES[name]
    expected = _run(function, make())

    def injected(*args, **kwargs):
        raise RuntimeError("injected launch failure")

    target = {"forward": "_forward_triton", "backward": "_backward_triton"}[where]
    if module is va:
        target = target.replace("_triton", "")
    monkeypatch.setattr(module, target, injected)
    with plugin_log(caplog, logging.WARNING):
        got = _run(function, make())
        again = _run(function, make())  # later calls: the reference, without a second warning
    assert (got[0] - expected[0]).abs().max() <= 1e-4
    for a, b in zip(got[1] + again[1], expected[1] + expected[1]):
        assert (a - b).abs().max() <= 1e-4
    said = [r.getMessage() for r in caplog.records if "injected launch failure" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(module.KERNEL) and "plain PyTorch" in said[0]


@pytest.mark.parametrize("name", list(CASES))
def test_ops_pass_torch_library_opcheck(name):
    function, make, module = CASES[name]
    inputs = make()
    ops = {"attention": (torch.ops.unsloth_patch.varlen_attention,
                         lambda q, k, v, cu, n: (q, k, v, cu, n, None, True, 7, 20.0)),
           "rmsnorm": (torch.ops.unsloth_patch.rms_norm, lambda x, w: (x, w, 1e-6, 0.0)),
           "gated": (torch.ops.unsloth_patch.gated_activation, lambda g, u: (g, u, False)),
           "rope": (torch.ops.unsloth_patch.rope, lambda q, k, c, s: (q, k, c, s))}
    op, arguments = ops[name]
    torch.library.opcheck(op, arguments(*inputs), test_utils=("test_schema", "test_autograd_registration",
                                                              "test_faketensor"))


@pytest.mark.parametrize("name", list(CASES))
def test_compiled_calls_match_eager(name):
    function, make, _ = CASES[name]
    expected = _run(function, make())
    torch._dynamo.reset()
    got = _run(torch.compile(function, fullgraph=True), make())
    assert (got[0] - expected[0]).abs().max() <= 1e-5
    for a, b in zip(got[1], expected[1]):
        assert (a - b).abs().max() <= 1e-5


OP_NAMES = {"attention": ("_attention_op", "_attention_backward_op"), "rmsnorm": ("_rms_norm_op", "_rms_norm_backward_op"),
            "gated": ("_gated_op", "_gated_backward_op"), "rope": ("_rope_op", "_rope_backward_op")}


@pytest.mark.parametrize("name", list(CASES))
def test_eager_calls_skip_the_dispatcher_and_match_the_op_bitwise(name, monkeypatch):
    """Eager training calls the op's body through a plain autograd.Function (less host time a call);
    ``_eager.DIRECT = False`` sends the same call through the custom op: identical outputs and gradients."""
    from unsloth_patch.kernels import _eager

    function, make, module = CASES[name]
    monkeypatch.setattr(_eager, "DIRECT", False)
    through_op = _run(function, make())
    monkeypatch.setattr(_eager, "DIRECT", True)
    calls = []
    for attribute in OP_NAMES[name]:
        op = getattr(module, attribute)
        monkeypatch.setattr(module, attribute, lambda *a, _op=op: calls.append(_op) or _op(*a))
    direct = _run(function, make())
    assert calls == []
    assert torch.equal(direct[0], through_op[0])
    assert len(direct[1]) == len(through_op[1]) >= 2
    assert all(torch.equal(a, b) for a, b in zip(direct[1], through_op[1]))


@pytest.mark.parametrize("name", list(CASES))
def test_fake_tensors_go_through_the_op(name):
    """Fake-tensor tracing (torch.compile's, torch.export's) needs the op's fake implementation, not the body."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    function, make, _ = CASES[name]
    real = make()
    expected = function(*real)
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fake = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in real]
        out = function(*fake)
    assert type(out) is not torch.Tensor and out.shape == expected.shape and out.dtype == expected.dtype


@pytest.mark.parametrize("name", list(CASES))
def test_a_dispatch_mode_sees_one_opaque_op(name):
    """Under a TorchDispatchMode (selective checkpointing's caches, FLOP counters) the call is the custom op,
    forward and backward, as the mode expects: it could not see a Triton launch inside a direct call."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    function, make, _ = CASES[name]
    expected = _run(function, make())
    with Seen() as seen:
        got = _run(function, make())
    ours = [op for op in seen.ops if op.startswith("unsloth_patch.")]
    assert len(ours) == 2 and ours[1].split(".")[1].endswith("_backward"), seen.ops
    assert torch.equal(got[0], expected[0]) and all(torch.equal(a, b) for a, b in zip(got[1], expected[1]))
