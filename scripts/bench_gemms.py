"""A ViT's dense-layer matmuls alone, in JAX and in PyTorch (benchmark --gemms).

forward x @ W, input gradient dy @ W^T, weight gradient x^T @ dy of each dense
layer of a block: the GEMMs that take half of a ViT-Ti train step. Tells the two
libraries' kernels apart from the rest of the step (layout, fusion, memory), in
fp32 on the CPU (or JAX's GPU).
"""
from __future__ import annotations

import statistics

import jax
import jax.numpy as jnp
import numpy as np

import bench_timing as timing


def gemm_shapes(vit: dict, batch_size: int) -> list[tuple[str, int, int, int]]:
  """(layer, rows, in, out) of each dense layer of a ViT block at this batch size."""
  rows = batch_size * ((vit["image_size"] // vit["patch_size"]) ** 2 + 1)
  D, M = vit["hidden_size"], vit["mlp_dim"]
  return [("qkv", rows, D, 3 * D), ("proj", rows, D, D), ("fc1", rows, D, M), ("fc2", rows, M, D)]


def gemm_comparison(vit: dict, batch_size: int, num_calls: int, threads: int) -> list[dict]:
  """Each dense layer's three matmuls, alone, in JAX (jit) and PyTorch on the same data."""
  import torch
  torch.set_num_threads(threads)
  device = "cuda" if torch.cuda.is_available() and jax.default_backend() == "gpu" else "cpu"
  torch_sync = (lambda _: torch.cuda.synchronize()) if device == "cuda" else (lambda _: None)
  ops = {"forward": lambda x, w, dy: (x, w, lambda a, b: a @ b),
         "input_grad": lambda x, w, dy: (dy, w, lambda a, b: a @ b.T),
         "weight_grad": lambda x, w, dy: (x, dy, lambda a, b: a.T @ b)}
  out = []
  for layer, R, I, O in gemm_shapes(vit, batch_size):
    r = np.random.default_rng(0)
    x, w, dy = (r.standard_normal(shape, dtype=np.float32) for shape in ((R, I), (I, O), (R, O)))
    for op, pick in ops.items():
      a, b, f = pick(x, w, dy)
      ja, jb = jnp.asarray(a), jnp.asarray(b)
      jf = jax.jit(f).lower(ja, jb).compile()
      jax.block_until_ready(jf(ja, jb))
      j_s = statistics.median(timing.time_calls(lambda: jf(ja, jb), num_calls,
                                                jax.block_until_ready))
      ta, tb = torch.from_numpy(a).to(device), torch.from_numpy(b).to(device)
      torch_sync(f(ta, tb))
      t_s = statistics.median(timing.time_calls(lambda: f(ta, tb), num_calls, torch_sync))
      gflop = 2 * R * I * O / 1e9
      out.append(dict(layer=layer, op=op, rows=R, inputs=I, outputs=O, jax_ms=1e3 * j_s,
                      torch_ms=1e3 * t_s, jax_gflops_per_s=gflop / j_s,
                      torch_gflops_per_s=gflop / t_s, jax_over_torch=t_s / j_s))
  return out
