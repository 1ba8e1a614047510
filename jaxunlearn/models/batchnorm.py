"""BatchNorm with PyTorch's `nn.BatchNorm2d` semantics, and a mask for padded batches.

Flax's `nn.BatchNorm` differs from PyTorch's in three ways that change a trained
model: its momentum is the weight of the OLD running value (0.99 vs PyTorch's 0.1
on the new batch value), its default epsilon is 1e-6 (PyTorch: 1e-5), and it
updates the running variance with the biased batch variance (PyTorch: unbiased,
times n / (n - 1)). This module follows PyTorch in all three, so weights, running
statistics and their updates carry over between the two unchanged.

The mask (B,) marks the real rows of a batch padded to a fixed shape: padding
rows never enter a statistic, so a padded batch gives exactly what PyTorch gives
on its real rows alone. The batch reductions are plain `jnp` sums over (B, H, W):
under `jax.jit` with the batch axis sharded over devices, XLA inserts the
all-reduce itself and every device sees the statistics of the GLOBAL batch.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def batch_moments(x_BxHxWxC, mask_B=None):
  """Per-channel (mean_C, biased var_C, n) over the real rows, in float32.

  n = real rows x H x W. Padding rows are selected away with `where` rather than
  multiplied by 0, so even inf or NaN padding cannot leak into the statistics.
  """
  x = x_BxHxWxC.astype(jnp.float32)
  B, H, W, _ = x.shape
  if mask_B is None:
    mean_C = jnp.mean(x, axis=(0, 1, 2))
    var_C = jnp.mean(jnp.square(x - mean_C), axis=(0, 1, 2))
    return mean_C, var_C, jnp.float32(B * H * W)
  real_Bx1x1x1 = (mask_B > 0).reshape(B, 1, 1, 1)
  n = jnp.sum(real_Bx1x1x1, dtype=jnp.float32) * (H * W)
  # An all-padding batch would divide by 0; its outputs are ignored anyway.
  safe_n = jnp.maximum(n, 1.0)
  # Zero the padding once, before any arithmetic: the backward pass then never
  # multiplies a zero cotangent by an infinite padding value.
  x = jnp.where(real_Bx1x1x1, x, 0.0)
  mean_C = jnp.sum(x, axis=(0, 1, 2)) / safe_n
  # Two passes (centre, then square) as PyTorch: no cancellation when |mean| >> std.
  var_C = jnp.sum(jnp.where(real_Bx1x1x1, jnp.square(x - mean_C), 0.0), axis=(0, 1, 2)) / safe_n
  return mean_C, var_C, n


def updated_running_stats(mean_C, var_C, batch_mean_C, batch_var_C, n, momentum):
  """PyTorch's update: running = (1 - m) running + m batch, the variance unbiased.

  With n <= 1 the unbiased variance is undefined (PyTorch raises); the running
  statistics are then kept as they are rather than poisoned with inf or NaN.
  """
  unbiased_var_C = batch_var_C * (n / jnp.maximum(n - 1.0, 1.0))
  new_mean_C = (1.0 - momentum) * mean_C + momentum * batch_mean_C
  new_var_C = (1.0 - momentum) * var_C + momentum * unbiased_var_C
  return jnp.where(n > 1, new_mean_C, mean_C), jnp.where(n > 1, new_var_C, var_C)


class BatchNorm(nn.Module):
  """`torch.nn.BatchNorm2d` over the last (channel) axis of NHWC inputs.

  Train mode normalises with the biased batch statistics (of the real rows) and,
  when the "batch_stats" collection is mutable and not initialising, updates the
  running "mean" and "var" there; eval mode normalises with the running ones.
  Statistics and the normalisation are float32; the output is cast to `dtype`.
  """
  momentum: float = 0.1  # PyTorch's: weight of the NEW batch statistic.
  epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC, train: bool, mask=None):
    C = x_BxHxWxC.shape[-1]
    scale_C = self.param("scale", nn.initializers.ones, (C,), jnp.float32)
    bias_C = self.param("bias", nn.initializers.zeros, (C,), jnp.float32)
    running_mean = self.variable("batch_stats", "mean", jnp.zeros, (C,), jnp.float32)
    running_var = self.variable("batch_stats", "var", jnp.ones, (C,), jnp.float32)
    if train:
      mean_C, var_C, n = batch_moments(x_BxHxWxC, mask)
      # Apply without mutable=["batch_stats"] (e.g. a train-mode forward for a
      # metric) still uses the batch statistics; it just cannot record them.
      if self.is_mutable_collection("batch_stats") and not self.is_initializing():
        running_mean.value, running_var.value = updated_running_stats(
            running_mean.value, running_var.value, mean_C, var_C, n, self.momentum)
    else:
      mean_C, var_C = running_mean.value, running_var.value
    mul_C = scale_C * jax.lax.rsqrt(var_C + self.epsilon)
    y = (x_BxHxWxC.astype(jnp.float32) - mean_C) * mul_C + bias_C
    return y.astype(self.dtype)
