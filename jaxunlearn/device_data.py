"""Device-resident data: the images and labels on the mesh, the pools, batch drawing and gathering.

Everything a step reads of the data lives on the devices: the training images
as uint8 at their stored size, the pools (training-set indices of "all",
"forget", "retain"), and each chunk's batch indices, drawn there from the
stream's epoch keys (`chunk_table`). Inside a step a batch is gathered by index
(`gather`), turned into float pixels in [0, 1] (`pixels`, what an objective may
perturb) and then into model input (`preprocess`: resize, normalise).

The batch axis is split over a ("data",) mesh of all devices and everything else
is replicated, so the same code is data-parallel on 1 or N devices; XLA inserts
the reductions over the batch (gradients, BatchNorm statistics) itself.
"""
from __future__ import annotations

import functools
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxunlearn import datasets


def make_mesh() -> jax.sharding.Mesh:
  # Auto axes: XLA propagates the batch sharding from the index tables and inserts
  # the gradient all-reduce itself.
  return jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))


def epoch_keys(key: jax.Array, num_epochs: int) -> jax.Array:
  """One key per epoch, `jax.random.split(key, n)[:num_epochs]` for a padded n >= num_epochs.

  A threefry split's first keys do not depend on how many are split (jax's default
  partitionable threefry; `tests/test_train.py` checks it), so one padded size
  serves every stage and the tables below compile once per pool.
  """
  n = max(256, 1 << (num_epochs - 1).bit_length())
  return _split(key, n)


_split = jax.jit(jax.random.split, static_argnums=1)


def stream_keys(key: jax.Array, pool_size: int, *, batch_size: int, num_steps: int,
                chunk: int) -> jax.Array:
  """The epoch keys `chunk_table` reads for chunks of a stream's steps [0, num_steps).

  Enough for a chunk starting at any of those steps, the last one's epochs included
  (dynamic slicing would clamp silently otherwise).
  """
  per_epoch = -(-pool_size // batch_size)
  return epoch_keys(key, max(num_steps - 1, 0) // per_epoch + (chunk - 1) // per_epoch + 2)


def chunk_table(keys_E, pool_N, start, num_steps, *, batch_size: int, width: int, chunk: int):
  """Indices and mask, each (chunk, width), of steps [start, start + chunk) of a stream.

  Epoch e is the permutation of `pool_N` drawn with keys_E[e], cut into
  S = ceil(N / batch_size) batches, the last one partial; step s is batch s % S of
  epoch s // S. Rows are padded from batch_size to `width` (a multiple of the
  device count), and steps from `num_steps` on are padding; padding has index 0
  and mask 0. A step's batch depends on the step alone, not on the chunk size: a
  run resumed at any step with another `chunk` draws the same batches. `start`
  and `num_steps` are traced, so one compile serves every chunk and stage drawing
  from pools of this size. `stream_keys` makes keys_E.
  """
  n = pool_N.shape[0]
  S = -(-n // batch_size)
  m = (chunk - 1) // S + 2  # epochs one chunk can touch
  first = start // S
  keys = jax.lax.dynamic_slice_in_dim(keys_E, first, m)
  # lax.map, not vmap: the same permutations, and XLA compiles one sort, not a batched one.
  perms_mxN = jax.lax.map(lambda k: jax.random.permutation(k, pool_N), keys)
  pad = ((0, 0), (0, S * batch_size - n))
  rows_idx = jnp.pad(perms_mxN, pad).reshape(m * S, batch_size)
  rows_mask = jnp.pad(jnp.ones((m, n), jnp.float32), pad).reshape(m * S, batch_size)
  steps_K = start + jnp.arange(chunk)
  live_K = steps_K < num_steps
  rows_K = steps_K - first * S
  idx = jnp.where(live_K[:, None], rows_idx[rows_K], 0).astype(jnp.int32)
  mask = rows_mask[rows_K] * live_K[:, None]
  pad_width = ((0, 0), (0, width - batch_size))
  return jnp.pad(idx, pad_width), jnp.pad(mask, pad_width)


class DeviceData:
  """One run's data on the mesh, and how a step reads it."""

  def __init__(self, data: datasets.Dataset, pools: Mapping[str, np.ndarray], *,
               steps_per_chunk: int, image_size: int | None = None, mean=0.5, std=0.5,
               mesh=None):
    """`pools` maps a pool name to training-set indices; `image_size` is the model's input side."""
    self.mesh = mesh or make_mesh()
    self.num_devices = self.mesh.devices.size
    self.num_classes = data.num_classes
    self.steps_per_chunk = steps_per_chunk
    self.image_size = image_size
    self.mean, self.std = mean, std
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharded = NamedSharding(self.mesh, P("data"))
    self.table_sharded = NamedSharding(self.mesh, P(None, "data"))
    self._pixel_max = float(data.pixel_max)
    self._copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree), out_shardings=self.replicated)
    self.train = (self.put(data.train_images), self.put(data.train_labels))
    self.test = (self.put(data.test_images), self.put(data.test_labels))
    self.num_train = len(data.train_labels)
    self.pools = {name: self.put(np.asarray(idx, np.int32)) for name, idx in pools.items()}
    self._tables: dict[int, object] = {}

  # ---- placement ----

  def put(self, x):
    """A host array, replicated. Every process holds the whole (small) data set and
    hands in all of it; on one host this is a plain device_put."""
    return jax.make_array_from_process_local_data(self.replicated, np.asarray(x))

  def place(self, tree):
    """Replicate a pytree (parameters, method inputs) over the mesh."""
    if jax.process_count() > 1:
      # Multi-host: device_put takes no PRNG keys onto other processes' devices (jax
      # 0.10); the compiled copy takes anything, each process handing in its equal copy.
      return self._copy(tree)
    return jax.device_put(tree, self.replicated)

  def copy(self, tree):
    """A replicated copy (the chunks donate their state; the caller keeps its arrays)."""
    return self._copy(tree)

  def width(self, batch_size: int) -> int:
    """Rows of a batch of `batch_size`: padded to a multiple of the device count."""
    return -(-batch_size // self.num_devices) * self.num_devices

  # ---- batches ----

  def table(self, batch_size: int):
    """The jitted `chunk_table` for streams of `batch_size` (one compile per size and pool size)."""
    if batch_size not in self._tables:
      self._tables[batch_size] = jax.jit(
          functools.partial(chunk_table, batch_size=batch_size, width=self.width(batch_size),
                            chunk=self.steps_per_chunk), out_shardings=self.table_sharded)
    return self._tables[batch_size]

  def pixels(self, images_BxHxWxC):
    """Stored uint8 images -> float pixels in [0, 1] at their stored size."""
    return images_BxHxWxC.astype(jnp.float32) / self._pixel_max

  def preprocess(self, pixels_BxHxWxC):
    """Float pixels in [0, 1] -> model input (resized to the model's side, normalised), batch-sharded."""
    x = datasets.normalize(pixels_BxHxWxC, self.image_size, self.mean, self.std)
    return jax.lax.with_sharding_constraint(x, self.batch_sharded)

  def gather(self, train, idx_B, mask_B, tables: Mapping[str, jax.Array]):
    """One batch as an objective reads it: pixels, labels, mask, indices and table rows."""
    images_N, labels_N = train
    return dict(image=self.pixels(images_N[idx_B]), label=labels_N[idx_B], mask=mask_B,
                index=idx_B, **{k: t[idx_B] for k, t in tables.items()})
