# What is live at the peak of train(): the allocator's trace from train()'s call, replayed; blocks live at the peak
# grouped by where they were allocated. usage: memtrace2.py <config> <out.json> [sft.py run args...]
import collections, functools, os, sys
sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
import torch, transformers
state = {}
original = transformers.Trainer.train
@functools.wraps(original)  # the plugin's signature check sees train()'s own parameters
def train(self, *a, **k):
    torch.cuda.synchronize(); state["base"] = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=4_000_000, stacks="python")
    return original(self, *a, **k)
transformers.Trainer.train = train
import sft
config, out, extra = sys.argv[1], sys.argv[2], sys.argv[3:]
sft.main(["run", "--config", config, "--model", "llama", "--data", "benchmarks/out/data", "--out", out, *extra])
snap = torch.cuda.memory._snapshot()
torch.cuda.memory._record_memory_history(enabled=None)
events = snap["device_traces"][0]
total, peak, peak_i = state["base"], 0, -1
for i, e in enumerate(events):
    if e["action"] == "alloc":
        total += e["size"]
        if total > peak: peak, peak_i = total, i
    elif e["action"] == "free_completed":
        total -= e["size"]
live = {}
for e in events[:peak_i + 1]:
    if e["action"] == "alloc": live[e["addr"]] = e
    elif e["action"] == "free_completed": live.pop(e["addr"], None)
def where(e, n=5):
    keep = [f"{f['filename'].split('site-packages/')[-1].split('/main/')[-1]}:{f['line']} {f['name']}" for f in e.get("frames", [])
            if not f["filename"].startswith("<") and not any(s in f["filename"] for s in ("torch/utils/_contextlib", "torch/nn/modules/module.py", "functools", "_compile.py", "eval_frame.py"))]
    return " <- ".join(keep[:n])
groups = collections.defaultdict(lambda: [0, 0])
for e in live.values():
    g = groups[where(e)]; g[0] += e["size"]; g[1] += 1
print(f"TRACE {config}: {len(events)} events from train(); before train() {state['base']/2**30:.3f} GiB; replayed peak {peak/2**30:.3f} GiB "
      f"at event {peak_i} ({peak_i/len(events):.0%} of the trace); new blocks live at the peak: {len(live)}, "
      f"{sum(e['size'] for e in live.values())/2**30:.3f} GiB")
print("  at the peak, allocating:", where(events[peak_i], 8))
for k, (size, n) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:22]:
    print(f"  {size/2**20:9.1f} MiB {n:6d}  {k[:330]}")
