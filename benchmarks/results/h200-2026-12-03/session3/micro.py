# per-process fixed costs of Triton on this host: the compile key, the driver's utils module, CUDA init
import os, sys, time, tempfile
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="micro-")  # cold, as a first run
t = time.perf_counter(); import torch; import triton; t_import = time.perf_counter() - t
import triton.runtime.cache as c, triton.compiler.compiler as cc
fn = getattr(c, "triton_key", None) or getattr(cc, "triton_key")
t = time.perf_counter(); fn(); t_key = time.perf_counter() - t
fn.cache_clear() if hasattr(fn, "cache_clear") else None
t = time.perf_counter(); fn(); t_key2 = time.perf_counter() - t
t = time.perf_counter(); torch.zeros(1, device="cuda"); t_cuda = time.perf_counter() - t
t = time.perf_counter(); from triton.runtime import driver; u = driver.active.utils; t_utils = time.perf_counter() - t
print(f"MICRO triton {triton.__version__} import {t_import:.2f}s key {t_key:.2f}s key-again {t_key2:.2f}s cuda-init {t_cuda:.2f}s driver-utils(cold) {t_utils:.2f}s key-in {'runtime.cache' if hasattr(c,'triton_key') else 'compiler'}")
