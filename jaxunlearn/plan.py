"""A phase's plan: how many steps it takes, and each chunk's scanned inputs.

Every step's batch, key and learning rate follow from its number alone, whatever
the chunk size, so a run resumed with another `steps_per_chunk` takes the same
steps (`Trainer.run`).
"""
from __future__ import annotations

from typing import Mapping

import jax
import numpy as np

from jaxunlearn.compile_cache import CompileCache
from jaxunlearn.device_data import DeviceData, stream_keys
from jaxunlearn.recipe import Phase, Stream


def scalars(hparams: Mapping[str, float]) -> dict[str, np.float32]:
  """Hyperparameters as float32 scalars: traced inputs of a compiled step, never constants."""
  return {k: np.float32(v) for k, v in hparams.items()}


def stream_batch(stream: Stream, batch_size: int) -> int:
  """A stream's batch size: its own, else the run's `batch_size`."""
  return stream.batch_size or batch_size


def steps_in(phase: Phase, pools: Mapping[str, jax.Array], batch_size: int) -> int:
  """The steps of a phase: the epochs of its one driving stream, capped at its `max_steps`."""
  drivers = [s for s in phase.streams.values() if s.epochs is not None]
  if len(drivers) != 1:
    raise ValueError(f"phase {phase.name!r} needs exactly one stream with epochs set")
  s = drivers[0]
  steps_ = s.epochs * -(-int(pools[s.pool].shape[0]) // stream_batch(s, batch_size))
  return min(steps_, s.max_steps) if s.max_steps is not None else steps_


def chunk_inputs(data: DeviceData, compiled: CompileCache, phase: Phase, rng, *,
                 batch_size: int, num_steps: int, start: int, first_step: int,
                 total_steps: int, lr_steps: tuple[int, int]):
  """The traced inputs of a phase's chunks: (args, chunk_xs).

  `args` are the same for every chunk; chunk_xs(c) is the scanned inputs of chunk c,
  which runs the phase's steps from start + c * steps_per_chunk on (`start`: the
  steps of the phase already done, on resume). `first_step`: the run's steps before
  the phase; `lr_steps` = (steps its optimizer has taken, steps it takes in the run).
  """
  K, opt = data.steps_per_chunk, phase.optimizer
  num_chunks = max(1, -(-(num_steps - start) // K))
  streams = {}  # batch key -> (table program, epoch keys, pool)
  for s_i, (name, s) in enumerate(sorted(phase.streams.items())):
    pool, bs = data.pools[s.pool], stream_batch(s, batch_size)
    keys = stream_keys(jax.random.fold_in(rng, s_i), int(pool.shape[0]), batch_size=bs,
                       num_steps=num_steps, chunk=K)
    streams[name] = (data.table(bs), keys, pool)
  all_steps = start + np.arange(num_chunks * K)
  active = (all_steps < num_steps).reshape(num_chunks, K)
  lr = opt.learning_rates(lr_steps[0] + all_steps, lr_steps[1]).reshape(num_chunks, K)
  step_no = (first_step + all_steps).astype(np.int32).reshape(num_chunks, K)
  args = data.place(dict(
      key=jax.random.fold_in(rng, 1 << 20), num_steps=np.int32(total_steps),
      sign=np.float32(phase.sign), opt_hp=opt.hyperparams(), hp=scalars(phase.hparams)))

  def chunk_xs(c):
    tables = {name: compiled(table, (), keys, pool, np.int32(start + c * K), np.int32(num_steps))
              for name, (table, keys, pool) in streams.items()}
    return dict(active=active[c], lr=lr[c], step=step_no[c], streams=tables)

  return args, chunk_xs
