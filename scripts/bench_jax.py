"""The JAX side of the benchmark: every row timed through `train.Trainer`'s public API only.

So what is timed is what the pipeline runs:
  * a step: `Trainer.stepper` of one phase; a call runs `steps_per_chunk` steps
    in one compiled `lax.scan`;
  * a method (`time_methods`): its recipe from its base-config section;
    `Trainer.prepare` (its prepare sweep, whole calls, row `<method>/prepare`),
    then one stepper per distinct step of the recipe (objective, streams and
    optimizer kind; row `<method>/<objective>`). A method without phases (SSD) is
    timed as whole `Trainer.run` calls instead (row `<method>/run`);
  * evaluation (`time_eval`): whole `Trainer.predict` calls over the test set;
  * `matmul_peak`: one large jitted matmul, the machine's practical peak.
"""
from __future__ import annotations

import concurrent.futures
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxunlearn import compile_cache, train
from jaxunlearn.methods import METHODS

import bench_timing as timing


def step_kinds(recipe: train.Recipe) -> list[train.Phase]:
  """The first phase of each distinct step of a recipe: objective, streams, optimizer kind.

  Phases that differ only in length, optimizer values or hyperparameters run the
  same compiled step at the same cost (those are traced inputs of the step).
  """
  seen = {}
  for phase in recipe.phases:
    key = (phase.objective, tuple(sorted((k, s.pool) for k, s in phase.streams.items())),
           phase.optimizer.kind)
    seen.setdefault(key, phase)
  return list(seen.values())


def row_names(method: str, phases: list[train.Phase]) -> list[str]:
  """`<method>/<objective>`; the phase's name is added where two steps share an objective."""
  names = [p.objective.__name__ for p in phases]
  return [f"{method}/{n}" if names.count(n) == 1 else f"{method}/{n}:{p.name}"
          for n, p in zip(names, phases)]


def chunk_key(trainer: train.Trainer, phase: train.Phase, inputs: train.Inputs) -> tuple:
  """Which compiled chunk a phase runs on, told apart as the Trainer's compile cache does.

  The Trainer keys a chunk by `compile_cache.key(its jit, static, (train state,
  data, inputs, args, per-step xs))` with static = (env, objective, stream names,
  optimizer kind) (`Trainer._plan`). Within one trainer the state and data are
  the same for every phase of an optimizer kind, and of the args and xs only the
  hyperparameter names and each stream's batch width vary (its batch size padded to
  a multiple of the device count); so the public key of these parts equals for two
  phases exactly when their chunks are one program.
  """
  static = (trainer.env, phase.objective, tuple(sorted(phase.streams)), phase.optimizer.kind)
  widths = tuple(trainer.data.width(trainer.stream_batch(s))
                 for _, s in sorted(phase.streams.items()))
  hparams = {k: np.float32(v) for k, v in phase.hparams.items()}
  return compile_cache.key("chunk", static + (widths,), (inputs, hparams))


def stepper(trainer: train.Trainer, phase: train.Phase, variables, inputs,
            warmup: int) -> tuple[train.Stepper, dict]:
  """A phase's Stepper, compiled and warmed up (its first call, then `warmup` more)."""
  t0 = time.perf_counter()
  s = trainer.stepper(phase, variables, inputs)
  setup_s = time.perf_counter() - t0  # compile + first call
  timing.time_calls(s, warmup, jax.block_until_ready)
  return s, dict(kind="step", phase=phase.name, objective=phase.objective.__name__,
                 streams={k: st.pool for k, st in sorted(phase.streams.items())},
                 optimizer=phase.optimizer.kind, compile_s=s.compile_seconds, setup_s=setup_s,
                 steps_per_call=s.steps)


def _parallel(fn: Callable, items: list, threads: int) -> list:
  """[fn(x) for x in items], `threads` at a time (XLA releases the GIL while it compiles)."""
  if threads <= 1:
    return [fn(x) for x in items]
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    return list(pool.map(fn, items))


class _Row:
  """A row ready to time: compiled, and called once."""

  def __init__(self, call: Callable[[], Any], info: dict, steps: int = 0,
               examples_per_step: int = 0):
    self.call = call  # one timed call
    self.info = info
    self.steps = steps  # per call; 0: a call without steps (a prepare sweep, a whole run)
    self.examples_per_step = examples_per_step


def _first_call(trainer: train.Trainer, call: Callable[[], Any]) -> tuple[Any, dict]:
  """A call's first run (it compiles): its result, wall time and this thread's compile time."""
  compile_before = trainer.compile_seconds()
  t0 = time.perf_counter()
  result = jax.block_until_ready(call())
  first_call_s = time.perf_counter() - t0
  return result, dict(kind="call", compile_s=trainer.compile_seconds() - compile_before,
                      first_call_s=first_call_s)


def _prepare_method(trainer: train.Trainer, name: str, section, variables):
  """A method's recipe, its inputs, and its prepare and run rows."""
  recipe = METHODS[name].recipe(section)
  rows = {}
  if recipe.prepare is None:
    inputs = trainer.prepare(recipe, variables)  # empty
  else:
    prepare = lambda: trainer.prepare(recipe, variables)
    inputs, info = _first_call(trainer, prepare)
    rows[f"{name}/prepare"] = _Row(prepare, info)
  if not recipe.phases:  # nothing to step through (SSD): time the whole stage
    run = lambda: trainer.run(variables, recipe, jax.random.key(0), name)[0]
    rows[f"{name}/run"] = _Row(run, _first_call(trainer, run)[1])
  return recipe, inputs, rows


def time_methods(trainer: train.Trainer, names: list[str], base, variables, num_calls: int,
                 threads: int, compiled_by: dict) -> dict[str, dict]:
  """Rows of the methods: prepare sweeps, one row per distinct step (or a whole run).

  Everything is compiled and called once first, `threads` rows at a time; then
  each row is timed alone, in turn. Rows whose chunk an earlier row compiles
  (`compiled_by`: chunk_key -> row) are built after the others, so that each
  compile is timed in the row that did it.
  """
  if trainer.mesh.devices.size > 1:
    # A multi-device program's collectives wait for one participant per device; two such
    # programs started at once can each hold a thread the other needs (XLA's CPU client
    # then aborts after 40 s: "Expected 2 threads to join the rendezvous"). One at a time.
    threads = 1
  print(f"  jax {', '.join(names)}: prepare ...", flush=True)
  prepared = _parallel(lambda n: _prepare_method(trainer, n, base[n], variables), names, threads)
  rows, waves = {}, ([], [])
  for name, (recipe, inputs, call_rows) in zip(names, prepared):
    rows.update(call_rows)
    phases = step_kinds(recipe)
    for row, phase in zip(row_names(name, phases), phases):
      rows[row] = None  # keeps the order: the method's rows together
      owner = compiled_by.setdefault(chunk_key(trainer, phase, inputs), row)
      waves[owner != row].append((row, phase, inputs, owner))

  def build(item):
    row, phase, inputs, owner = item
    print(f"  jax {row}: compile ...", flush=True)
    s, info = stepper(trainer, phase, variables, inputs, warmup=0)
    return row, _Row(s, dict(info, compiled_by=owner), s.steps, s.examples_per_step)

  for wave in waves:
    rows.update(_parallel(build, wave, threads))
  out = {}
  for name, r in rows.items():
    print(f"  jax {name} ...", flush=True)
    times = timing.time_calls(r.call, num_calls, jax.block_until_ready)
    if r.steps:
      out[name] = dict(r.info, **timing.rates(times, r.steps, r.examples_per_step))
    else:
      out[name] = dict(r.info, **timing.per_call(times))
  return out


def time_eval(trainer: train.Trainer, variables, num_calls: int, warmup: int) -> dict:
  """Whole `Trainer.predict` calls over the test set; a "step" is one batch of the lax.map."""
  n = int(trainer.test[1].shape[0])
  num_batches = -(-n // trainer.eval_width)
  call = lambda: trainer.predict(variables, "test")
  first_call_s = timing.time_calls(call, 1, jax.block_until_ready)[0]
  timing.time_calls(call, warmup, jax.block_until_ready)
  times = timing.time_calls(call, num_calls, jax.block_until_ready)
  # predict's jit is not on the Trainer's compile clock: estimate it.
  compile_s = max(first_call_s - statistics.median(times), 0.0)
  return dict(kind="step", first_call_s=first_call_s, compile_s=compile_s,
              compile_s_estimated=True, steps_per_call=num_batches,
              **timing.rates(times, num_batches, n / num_batches))


def matmul_peak(n: int, dtype: str, num_calls: int) -> dict:
  """GFLOP/s of one jitted (n, n) @ (n, n) on JAX's default device: the practical peak."""
  ka, kb = jax.random.split(jax.random.key(0))
  a_NxN, b_NxN = (jax.random.normal(k, (n, n), jnp.float32).astype(dtype) for k in (ka, kb))
  dot = jax.jit(jnp.dot).lower(a_NxN, b_NxN).compile()
  jax.block_until_ready(dot(a_NxN, b_NxN))
  times = timing.time_calls(lambda: dot(a_NxN, b_NxN), num_calls, jax.block_until_ready)
  s = statistics.median(times)
  return dict(n=n, ms=1e3 * s, gflops_per_s=2 * n**3 / s / 1e9)
