"""The one training loop every model and unlearning method runs.

A run is a list of `Phase`s sharing one optimizer state. A phase draws batches
from named `Stream`s over subsets ("pools") of the training set, with the study's
epoch semantics: reshuffled every epoch, last partial batch kept (padded and
masked, never dropped, never recompiled for).

Everything in the hot loop stays on the devices: the training images live there
as uint8, batch indices are drawn there, and `steps_per_chunk` steps run as one
compiled `lax.scan`. The batch axis is split over a ("data",) mesh of all devices
and parameters are replicated, so the same code is data-parallel on 1 or N devices.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import threading
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from jaxunlearn import datasets

Objective = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


class Cancelled(Exception):
  """A run stopped early through `Trainer.cancel`."""


@dataclasses.dataclass(frozen=True)
class Stream:
  """Batches from one pool of training examples."""
  pool: str  # "all", "forget" or "retain"
  # Passes over the pool that set the phase's length. None: a stream that
  # follows the driving one and restarts (reshuffled) whenever it runs out.
  epochs: int | None = None
  # Stop the phase after this many batches (stage 1 of two-stage takes one).
  max_steps: int | None = None


@dataclasses.dataclass(frozen=True)
class Phase:
  name: str
  objective: Objective
  streams: Mapping[str, Stream]  # batch key (what the objective reads) -> stream
  # +1 minimises the objective, -1 maximises it (gradient ascent). A traced input,
  # so both directions share one compiled step.
  sign: float = 1.0


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


def stream_keys(key: jax.Array, pool_size: int, *, batch_size: int, num_chunks: int,
                chunk: int) -> jax.Array:
  """The epoch keys `chunk_table` reads for chunks 0..num_chunks-1 of a stream over a pool.

  Enough for the last chunk's epochs (dynamic slicing would clamp silently otherwise).
  """
  per_epoch = -(-pool_size // batch_size)
  return epoch_keys(key, num_chunks * chunk // per_epoch + chunk // per_epoch + 2)


def chunk_table(keys_E, pool_N, c, num_steps, *, batch_size: int, width: int, chunk: int):
  """Indices and mask, each (chunk, width), of steps [c * chunk, (c + 1) * chunk) of a stream.

  Epoch e is the permutation of `pool_N` drawn with keys_E[e], cut into
  S = ceil(N / batch_size) batches, the last one partial; step s is batch s % S of
  epoch s // S. Rows are padded from batch_size to `width` (a multiple of the
  device count), and steps from `num_steps` on are padding; padding has index 0
  and mask 0. `c` and `num_steps` are traced, so one compile serves every chunk
  and stage drawing from pools of this size. `stream_keys` makes keys_E.
  """
  n = pool_N.shape[0]
  S = -(-n // batch_size)
  m = (chunk - 1) // S + 2  # epochs one chunk can touch
  first = c * chunk // S
  keys = jax.lax.dynamic_slice_in_dim(keys_E, first, m)
  # lax.map, not vmap: the same permutations, and XLA compiles one sort, not a batched one.
  perms_mxN = jax.lax.map(lambda k: jax.random.permutation(k, pool_N), keys)
  pad = ((0, 0), (0, S * batch_size - n))
  rows_idx = jnp.pad(perms_mxN, pad).reshape(m * S, batch_size)
  rows_mask = jnp.pad(jnp.ones((m, n), jnp.float32), pad).reshape(m * S, batch_size)
  steps_K = c * chunk + jnp.arange(chunk)
  live_K = steps_K < num_steps
  rows_K = steps_K - first * S
  idx = jnp.where(live_K[:, None], rows_idx[rows_K], 0).astype(jnp.int32)
  mask = rows_mask[rows_K] * live_K[:, None]
  pad_width = ((0, 0), (0, width - batch_size))
  return jnp.pad(idx, pad_width), jnp.pad(mask, pad_width)


class Trainer:
  """Holds the device-resident data and the compiled steps of one pipeline run."""

  def __init__(self, model, data: datasets.Dataset, forget_class: int, *, batch_size: int,
               momentum: float, steps_per_chunk: int,
               eval_batch_size: int, mesh=None, progress: bool = True):
    self.model = model
    self.mesh = mesh or make_mesh()
    self.batch_size = batch_size
    n_dev = self.mesh.devices.size
    self.width = -(-batch_size // n_dev) * n_dev
    self.eval_width = -(-eval_batch_size // n_dev) * n_dev
    self.steps_per_chunk = steps_per_chunk
    self.progress = progress
    # The learning rate lives in the optimizer state, so runs with different rates
    # (training vs unlearning) share one compiled step.
    self.tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.0, momentum=momentum)
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharded = NamedSharding(self.mesh, P("data"))
    self.table_sharded = NamedSharding(self.mesh, P(None, "data"))
    self._pixel_max = float(data.pixel_max)
    # Every process holds the whole (small) data set, so each one hands in all of
    # it; on one host this is a plain device_put.
    put = lambda x: jax.make_array_from_process_local_data(self.replicated, np.asarray(x))
    self.train = (put(data.train_images), put(data.train_labels))
    self.test = (put(data.test_images), put(data.test_labels))
    labels = data.train_labels
    self.pools = {
        "all": put(np.arange(len(labels), dtype=np.int32)),
        "forget": put(np.flatnonzero(labels == forget_class).astype(np.int32)),
        "retain": put(np.flatnonzero(labels != forget_class).astype(np.int32)),
    }
    self._chunk_fns: dict[Any, Callable] = {}
    self._lock = threading.Lock()  # stages may run in threads (config.concurrent_stages)
    # Set to stop every run of this trainer at its next chunk (a sibling stage failed).
    self.cancel = threading.Event()
    self._predict_fn = jax.jit(self._predict, static_argnames=("num_batches",))
    self._copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree), out_shardings=self.replicated)
    # One chunk of a stream's batch indices and masks, drawn on the devices.
    self.chunk_table = jax.jit(
        functools.partial(chunk_table, batch_size=batch_size, width=self.width,
                          chunk=steps_per_chunk), out_shardings=self.table_sharded)
    # Incremented each time a chunk function is traced (tests check: once per objective).
    self.num_traces = 0

  # ---- the model as the steps see it ----

  def apply(self, params, images_BxHxWxC):
    x = datasets.preprocess(images_BxHxWxC, self._pixel_max, self.model.image_size)
    x = jax.lax.with_sharding_constraint(x, self.batch_sharded)
    return self.model.apply({"params": params}, x)

  def place(self, params):
    """Replicate a parameter pytree over the mesh."""
    return jax.device_put(params, self.replicated)

  # ---- training ----

  def steps_in(self, phase: Phase) -> int:
    drivers = [s for s in phase.streams.values() if s.epochs is not None]
    if len(drivers) != 1:
      raise ValueError(f"phase {phase.name!r} needs exactly one stream with epochs set")
    s = drivers[0]
    steps = s.epochs * -(-int(self.pools[s.pool].shape[0]) // self.batch_size)
    return min(steps, s.max_steps) if s.max_steps is not None else steps

  def _chunk_fn(self, objective: Objective, stream_names: tuple[str, ...]):
    key = (objective, stream_names)
    with self._lock:
      if key not in self._chunk_fns:
        self._chunk_fns[key] = jax.jit(
            functools.partial(self._run_chunk, objective), donate_argnums=(0,),
            out_shardings=self.replicated)
      return self._chunk_fns[key]

  def _run_chunk(self, objective, state, train, xs):
    """`steps_per_chunk` steps in one scan; inactive (padding) steps are skipped."""
    with self._lock:
      self.num_traces += 1
    images_N, labels_N = train

    def step(state, x):
      params, opt_state = state
      batch = {}
      for name, (idx_B, mask_B) in x["streams"].items():
        batch[name] = dict(image=images_N[idx_B], label=labels_N[idx_B], mask=mask_B)
      def signed(params):
        loss, aux = objective(self.apply, params, batch)
        return x["sign"] * loss, aux

      (loss, aux), grads = jax.value_and_grad(signed, has_aux=True)(params)
      updates, new_opt = self.tx.update(grads, opt_state, params)
      examples = sum(jnp.sum(m) for _, m in x["streams"].values())
      return (optax.apply_updates(params, updates), new_opt), dict(loss=loss, examples=examples, **aux)

    def skip(state, x):
      # Same output structure as `step`, without computing it.
      out = jax.eval_shape(step, state, x)[1]
      return state, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out)

    # A phase rarely fills its last chunk (stage 1 of two-stage is a single step):
    # cond runs only the taken branch, so padding steps cost nothing.
    return jax.lax.scan(lambda st, x: jax.lax.cond(x["active"], step, skip, st, x), state, xs)

  def run(self, params, phases: list[Phase], rng: jax.Array, desc: str, learning_rate: float,
          bar_position: int = 0):
    """Optimise `params` through `phases` with one fresh optimizer; returns (params, log).

    Thread-safe: independent runs may go on in parallel threads (`bar_position`
    keeps their progress bars on separate lines).
    """
    # A fresh copy: the chunk steps donate their state, and the caller keeps its params.
    params = self._copy(params)
    opt_state = self.tx.init(params)
    opt_state.hyperparams["learning_rate"] = jnp.asarray(learning_rate, jnp.float32)
    state = (params, jax.device_put(opt_state, self.replicated))
    log = {"loss": []}
    K = self.steps_per_chunk
    for p_i, phase in enumerate(phases):
      num_steps = self.steps_in(phase)
      num_chunks = -(-num_steps // K)
      pkey = jax.random.fold_in(rng, p_i)
      streams = {}  # batch key -> (epoch keys, pool)
      for s_i, (name, s) in enumerate(sorted(phase.streams.items())):
        pool = self.pools[s.pool]
        keys = stream_keys(jax.random.fold_in(pkey, s_i), int(pool.shape[0]),
                           batch_size=self.batch_size, num_chunks=num_chunks, chunk=K)
        streams[name] = (keys, pool)
      active = (np.arange(num_chunks * K) < num_steps).reshape(num_chunks, K)
      fn = self._chunk_fn(phase.objective, tuple(sorted(phase.streams)))
      sign = np.full(K, phase.sign, np.float32)
      bar = tqdm(total=num_steps, desc=f"{desc}/{phase.name}", disable=not self.progress,
                 unit="step", dynamic_ncols=True, leave=True, position=bar_position)
      pending, t0, seen = None, time.perf_counter(), 0
      for c in range(num_chunks + 1):
        if self.cancel.is_set():
          raise Cancelled(f"{desc}: stopped because another stage failed")
        if c < num_chunks:
          tables = {name: self.chunk_table(keys, pool, c, num_steps)
                    for name, (keys, pool) in streams.items()}
          xs = dict(active=active[c], sign=sign, streams=tables)
          state, metrics = fn(state, self.train, xs)
        # Read the previous chunk's metrics while this one runs: no host stall.
        if pending is not None:
          seen += self._report(pending, bar, phase, log, t0, seen, steps_done=min((c) * K, num_steps))
        pending = (metrics, min(K, num_steps - c * K)) if c < num_chunks else None
      bar.close()
    return state[0], log

  def _report(self, pending, bar, phase, log, t0, seen, steps_done):
    metrics, n_active = pending
    m = jax.device_get(metrics)
    losses_K = np.asarray(m["loss"])[:n_active]
    if not np.all(np.isfinite(losses_K)):
      raise FloatingPointError(
          f"{phase.name}: loss is {losses_K[~np.isfinite(losses_K)][0]} near step {steps_done}; "
          "lower config.optimizer.learning_rate or the number of epochs")
    log["loss"].extend(float(v) for v in losses_K)
    examples = int(np.sum(np.asarray(m["examples"])[:n_active]))
    rate = (seen + examples) / max(time.perf_counter() - t0, 1e-9)
    bar.update(n_active)
    bar.set_postfix(loss=f"{losses_K.mean():.4f}", ex_per_s=f"{rate:,.0f}")
    return examples

  # ---- evaluation ----

  def _predict(self, params, data, *, num_batches: int):
    images_N, labels_N = data
    n = labels_N.shape[0]
    idx = jnp.minimum(jnp.arange(num_batches * self.eval_width), n - 1)
    idx = jax.lax.with_sharding_constraint(idx.reshape(num_batches, -1), self.table_sharded)

    def one(idx_B):
      logits, feats = self.apply(params, images_N[idx_B])
      return jax.nn.softmax(logits, axis=-1), feats

    probs, feats = jax.lax.map(one, idx)
    return probs.reshape(-1, probs.shape[-1])[:n], feats.reshape(-1, feats.shape[-1])[:n]

  def predict(self, params, split: str):
    """Class probabilities (N, C) and features (N, D) of every example of a split."""
    data = self.train if split == "train" else self.test
    n = int(data[1].shape[0])
    return self._predict_fn(self.place(params), data, num_batches=-(-n // self.eval_width))
