"""Host cost of the chunked MLP's forward + backward on tiny tensors (the time is dispatch and Python), 22 layers."""
import sys, time, statistics, torch
from unsloth_patch.kernels import swiglu
swiglu.is_supported = lambda d, t: False  # the activation's PyTorch reference, as the same cost in both builds
from unsloth_patch.kernels.chunked_mlp import chunked_gated_mlp, Projection
torch.manual_seed(0); torch.set_num_threads(1)
T, H, I, r, LAYERS = 16, 16, 32, 4, 22
def P(o, i): return Projection(torch.randn(o, i), torch.randn(r, i, requires_grad=True), torch.randn(o, r, requires_grad=True), 2.0)
mlps = [(P(I, H), P(I, H), P(H, I)) for _ in range(LAYERS)]
def step():
    x = torch.randn(T, H, requires_grad=True); h = x
    for g, u, d in mlps: h = chunked_gated_mlp(h, g, u, d, chunk=T) + h
    h.sum().backward()
for _ in range(20): step()
times = []
for _ in range(int(sys.argv[1])):
    s = time.perf_counter(); step(); times.append(time.perf_counter() - s)
print(statistics.median(times) * 1e3)
