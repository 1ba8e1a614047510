"""The one training loop every model and unlearning method runs: the host side.

`Trainer.run` drives a stage's `Recipe` (see `recipe.py`) chunk by chunk: it
plans each phase's batches and learning rates, calls the compiled chunk of
steps (`steps.py`), reads the previous chunk's losses while the next one runs,
moves the progress bar, saves snapshots and resumes from them, and stops on a
non-finite loss. The rest lives in its own module:

  recipe.py         the step contract: Recipe, Phase, Stream, Inputs
  optimizers.py     Optimizer (SGD, Adam, AdamW as PyTorch's) and schedules
  steps.py          the compiled programs (train chunk, sweep, edit) and Context
  device_data.py    the data on the mesh, batch drawing and gathering
  compile_cache.py  compiled programs by signature, and the compile-time clock
  evaluate.py       prediction and metrics

The names a method uses are re-exported here (`train.Phase`, `train.Optimizer`, ...).
The train state is a pytree {"params", "model_state", "opt"}: the model state
(BatchNorm's running statistics; {} for the ViT) rides beside the parameters
through every step, snapshot and checkpoint.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxunlearn import compile_cache, datasets, evaluate, optimizers, steps
from jaxunlearn.device_data import (DeviceData, chunk_table, epoch_keys,  # noqa: F401
                                    make_mesh, stream_keys)
from jaxunlearn.models.base import Model, model_state
from jaxunlearn.optimizers import Optimizer
from jaxunlearn.recipe import Inputs, Objective, Phase, Recipe, Stream  # noqa: F401
from jaxunlearn.steps import Context  # noqa: F401


class Cancelled(Exception):
  """A run stopped early through `Trainer.cancel`."""


class Diverged(FloatingPointError):
  """A run whose loss or parameters became non-finite (at `step`, in `phase`)."""

  def __init__(self, message: str, *, step: int, phase: str):
    super().__init__(message)
    self.step, self.phase = step, phase


@dataclasses.dataclass(frozen=True)
class Stepper:
  """A compiled chunk of one phase (`Trainer.stepper`): call it to run `steps` more steps."""
  call: Callable[[], Any]  # returns the chunk's per-step metrics (on the device)
  state: Callable[[], Any]  # the current {"params", "model_state", "opt"}
  compile_seconds: float
  steps: int  # steps per call
  examples_per_step: int  # images through the model per step

  def __call__(self):
    return self.call()


def _scalars(hparams: Mapping[str, float]) -> dict[str, np.float32]:
  """Hyperparameters as float32 scalars: traced inputs of a compiled step, never constants."""
  return {k: np.float32(v) for k, v in hparams.items()}


def as_model(model) -> Model:
  """A `Model`, or a bare stateless Linen module (its `image_size`, if any, is its input side)."""
  return model if isinstance(model, Model) else Model(model, getattr(model, "image_size", None))


class Trainer:
  """Drives the compiled programs of one pipeline run over its device-resident data."""

  def __init__(self, model, data: datasets.Dataset, pools: Mapping[str, np.ndarray], *,
               batch_size: int, steps_per_chunk: int, eval_batch_size: int, mesh=None,
               progress: bool = True, mean=0.5, std=0.5, augment: str = "none"):
    """`pools` maps a pool name ("all", "forget", "retain") to training-set indices.

    `model` is a `models.Model` (or a stateless Linen module); `mean`, `std`
    normalise the pixels (a number or one per channel); `augment` is the training
    augmentation of the streams that take it (`augment.KINDS`).
    """
    self.model = as_model(model)
    self.data = device = DeviceData(data, pools, steps_per_chunk=steps_per_chunk,
                                    image_size=self.model.image_size, mean=mean, std=std, mesh=mesh)
    self.mesh, self.replicated = device.mesh, device.replicated
    self.train, self.test, self.pools = device.train, device.test, device.pools
    self.num_classes = data.num_classes
    self.batch_size = batch_size
    self.width = device.width(batch_size)
    self.eval_width = device.width(eval_batch_size)
    self.steps_per_chunk = steps_per_chunk
    self.progress = progress
    self.env = steps.Env(self.model, device, {k: optimizers.transform(k) for k in optimizers.KINDS},
                         augment=augment)
    self.compiled = compile_cache.CompileCache()
    # Set to stop every run of this trainer at its next chunk (a sibling stage failed).
    self.cancel = threading.Event()
    self._chunk_jit = jax.jit(steps.run_chunk, static_argnums=(0, 1, 2, 3), donate_argnums=(4,),
                              out_shardings=device.replicated)
    self._sweep_jit = jax.jit(steps.sweep, static_argnums=(0, 1, 2, 3), out_shardings=device.replicated)
    self._edit_jit = jax.jit(steps.edit, static_argnums=(0, 1), out_shardings=device.replicated)

  @property
  def num_traces(self) -> int:
    """Programs traced so far (tests check: once per objective)."""
    return self.env.traces[0]

  def place(self, tree):
    return self.data.place(tree)

  def compile_seconds(self) -> float:
    """Seconds this thread has spent compiling (the stages read its change)."""
    return self.compiled.seconds()

  # ---- planning ----

  def stream_batch(self, stream: Stream) -> int:
    return stream.batch_size or self.batch_size

  def steps_in(self, phase: Phase) -> int:
    drivers = [s for s in phase.streams.values() if s.epochs is not None]
    if len(drivers) != 1:
      raise ValueError(f"phase {phase.name!r} needs exactly one stream with epochs set")
    s = drivers[0]
    steps_ = s.epochs * -(-int(self.pools[s.pool].shape[0]) // self.stream_batch(s))
    return min(steps_, s.max_steps) if s.max_steps is not None else steps_

  def new_state(self, params, optimizer: Optimizer):
    """A fresh optimizer state for `params`, replicated."""
    opt_state = optimizers.transform(optimizer.kind).init(params)
    opt_state.hyperparams.update(learning_rate=jnp.float32(optimizer.learning_rate),
                                 **optimizer.hyperparams())
    return self.place(opt_state)

  def _plan(self, phase: Phase, rng, *, num_steps: int, start: int, first_step: int,
            total_steps: int, lr_steps: tuple[int, int]):
    """What a phase's chunks need: static key, traced args, per-chunk inputs.

    Returns (static, args, chunk_xs) with chunk_xs(c) the scanned inputs of chunk c,
    which runs the phase's steps from start + c * steps_per_chunk on (`start`: the
    steps of the phase already done, on resume). Every step's batch, key and
    learning rate follow from its number alone, whatever the chunk size.
    `lr_steps` = (steps its optimizer has taken, steps it takes in the run).
    """
    K, opt = self.steps_per_chunk, phase.optimizer
    num_chunks = max(1, -(-(num_steps - start) // K))
    streams = {}  # batch key -> (table program, epoch keys, pool)
    for s_i, (name, s) in enumerate(sorted(phase.streams.items())):
      pool, bs = self.pools[s.pool], self.stream_batch(s)
      keys = stream_keys(jax.random.fold_in(rng, s_i), int(pool.shape[0]), batch_size=bs,
                         num_steps=num_steps, chunk=K)
      streams[name] = (self.data.table(bs), keys, pool)
    all_steps = start + np.arange(num_chunks * K)
    active = (all_steps < num_steps).reshape(num_chunks, K)
    lr = opt.learning_rates(lr_steps[0] + all_steps, lr_steps[1]).reshape(num_chunks, K)
    step_no = (first_step + all_steps).astype(np.int32).reshape(num_chunks, K)
    args = self.place(dict(
        key=jax.random.fold_in(rng, 1 << 20), num_steps=np.int32(total_steps),
        sign=np.float32(phase.sign), opt_hp=opt.hyperparams(), hp=_scalars(phase.hparams)))

    def chunk_xs(c):
      tables = {name: self.compiled(table, (), keys, pool, np.int32(start + c * K),
                                    np.int32(num_steps))
                for name, (table, keys, pool) in streams.items()}
      return dict(active=active[c], lr=lr[c], step=step_no[c], streams=tables)

    return self.chunk_static(phase), args, chunk_xs

  def chunk_static(self, phase: Phase) -> tuple:
    """The static arguments of a phase's compiled chunk: phases with equal ones share a compile
    (`compile_cache.key` adds the arrays' shapes)."""
    augmented = tuple((name, s.augment and self.env.augment != "none")
                      for name, s in sorted(phase.streams.items()))
    return (self.env, phase.objective, augmented, phase.optimizer.kind)

  def prepare(self, recipe: Recipe, variables) -> Inputs:
    """The recipe's method inputs (its prepare sweep), replicated; empty without one."""
    return self.place(recipe.prepare(self, variables)) if recipe.prepare else Inputs()

  def _chunk(self, static, state, inputs, args, xs):
    return self.compiled(self._chunk_jit, static, state, self.train, inputs, args, xs)

  # ---- the loop ----

  def run(self, variables, recipe: Recipe | list[Phase], rng: jax.Array, desc: str,
          bar_position: int = 0, *, snapshots=None, resume: dict | None = None):
    """Runs a stage's recipe from `variables` ({"params", ...model state}); returns (variables, log).

    The log has the loss of every step and `compile_seconds`, the part of the
    wall time spent compiling. Thread-safe: independent runs may go on in
    parallel threads (`bar_position` keeps their progress bars on separate lines).

    `snapshots` (optional) is asked at every chunk boundary whether a snapshot is
    `due()`; if so its `save(position, arrays, log)` gets the full training state:
    position {"phase", "step"} (the phase's index and its steps done: a step, not
    a chunk, so any chunk size can resume it), arrays {"params", "model_state",
    "opt": {optimizer name: state}} and the losses so far. `resume` (such a
    snapshot, as `snapshot_template` restores it, plus "loss") continues from
    there, with this trainer's `steps_per_chunk` whatever the snapshot's was: the
    same steps, batches and keys as an uninterrupted run, so the same result. A
    non-finite loss or parameter raises `Diverged` with the step.
    """
    if not isinstance(recipe, Recipe):
      recipe = Recipe(list(recipe))
    compile_before = self.compile_seconds()
    variables = self.data.copy(variables)  # the chunks donate their state; the caller keeps its own
    inputs = self.prepare(recipe, variables)  # from the stage's start: deterministic on resume too
    log = {"loss": list(resume["loss"]) if resume else []}
    phases = recipe.phases
    # The run's step count and each optimizer's, for progress and learning-rate schedules.
    counts = [self.steps_in(p) for p in phases]
    per_opt: dict[str, int] = {}
    for p, n in zip(phases, counts):
      per_opt[p.optimizer.name] = per_opt.get(p.optimizer.name, 0) + n
      if any(q.optimizer.name == p.optimizer.name and q.optimizer != p.optimizer for q in phases):
        raise ValueError(f"{desc}: phases share optimizer {p.optimizer.name!r} with different settings")
    params, state = variables["params"], model_state(variables)
    opt_states: dict[str, Any] = {}
    start_phase, start_step = 0, 0
    if resume:
      start_phase, start_step = resume["phase"], resume["step"]
      arrays = resume["arrays"]
      params, state, opt_states = arrays["params"], arrays["model_state"], dict(arrays["opt"])
    opt_done = dict.fromkeys(per_opt, 0)
    for p, n in zip(phases[:start_phase], counts[:start_phase]):
      opt_done[p.optimizer.name] += n
    done, K = sum(counts[:start_phase]), self.steps_per_chunk
    bar = tqdm(total=sum(counts), initial=len(log["loss"]), desc=desc,
               disable=not self.progress or not phases, unit="step", dynamic_ncols=True,
               leave=True, position=bar_position)
    t0, seen = time.perf_counter(), 0
    for p_i, (phase, num_steps) in enumerate(zip(phases, counts)):
      if p_i < start_phase:
        continue
      opt = phase.optimizer
      if opt.name not in opt_states:
        opt_states[opt.name] = self.new_state(params, opt)
      train_state = dict(params=params, model_state=state, opt=opt_states.pop(opt.name))
      first = start_step if p_i == start_phase else 0  # the phase's steps done
      static, args, chunk_xs = self._plan(
          phase, jax.random.fold_in(rng, p_i), num_steps=num_steps, start=first,
          first_step=done, total_steps=sum(counts),
          lr_steps=(opt_done[opt.name], per_opt[opt.name]))
      num_chunks = -(-(num_steps - first) // K)
      if len(phases) > 1:
        bar.set_description(f"{desc}/{phase.name}")
      pending = None
      for c in range(num_chunks + 1):
        step = first + c * K  # the chunk's first step in the phase
        if self.cancel.is_set():
          raise Cancelled(f"{desc}: stopped because another stage failed")
        if (snapshots is not None and c < num_chunks and (p_i, step) != (start_phase, start_step)
            and snapshots.due()):
          if pending is not None:  # the log must hold every step before the snapshot
            seen += self._report(pending, bar, phase, log, t0, seen)
            pending = None
          snapshots.save({"phase": p_i, "step": step},
                         {"params": train_state["params"], "model_state": train_state["model_state"],
                          "opt": {**opt_states, opt.name: train_state["opt"]}}, log)
        if c < num_chunks:
          train_state, metrics = self._chunk(static, train_state, inputs, args, chunk_xs(c))
        # Read the previous chunk's metrics while this one runs: no host stall.
        if pending is not None:
          seen += self._report(pending, bar, phase, log, t0, seen)
        pending = (metrics, min(K, num_steps - step), done + step) if c < num_chunks else None
      params, state = train_state["params"], train_state["model_state"]
      opt_states[opt.name] = train_state["opt"]
      opt_done[opt.name] += num_steps
      done += num_steps
    bar.close()
    variables = {"params": params, **state}
    if recipe.edit is not None:
      hp = self.place(_scalars(recipe.edit_hparams))
      variables = self.compiled(self._edit_jit, (self.env, recipe.edit), variables, inputs, hp)
      if not steps._finite(variables["params"]):
        raise Diverged(f"{desc}: non-finite parameters after its edit", step=done, phase="edit")
    log["compile_seconds"] = self.compile_seconds() - compile_before
    return variables, log

  def _report(self, pending, bar, phase, log, t0, seen):
    """Logs a finished chunk's losses (raises `Diverged` on a non-finite one); returns its examples."""
    metrics, n_active, first_step = pending
    m = jax.device_get(metrics)
    losses_K = np.asarray(m["loss"])[:n_active]
    bad = np.flatnonzero(~np.isfinite(losses_K))
    if len(bad) or not m["params_finite"]:
      step = first_step + (int(bad[0]) if len(bad) else n_active - 1)
      what = f"loss {losses_K[bad[0]]}" if len(bad) else "non-finite parameters"
      raise Diverged(f"{phase.name}: {what} at step {step}; lower the learning rate or the "
                     "number of epochs", step=step, phase=phase.name)
    log["loss"].extend(float(v) for v in losses_K)
    examples = int(np.sum(np.asarray(m["examples"])[:n_active]))
    rate = (seen + examples) / max(time.perf_counter() - t0, 1e-9)
    bar.update(len(losses_K))
    bar.set_postfix(loss=f"{losses_K.mean():.4f}", ex_per_s=f"{rate:,.0f}")
    return examples

  def snapshot_template(self, variables, optimizers_by_name: dict[str, Optimizer]):
    """Abstract arrays (shapes, dtypes, shardings) of a snapshot, to restore one."""
    make = lambda: {"params": variables["params"], "model_state": model_state(variables),
                    "opt": {n: self.new_state(variables["params"], o)
                            for n, o in optimizers_by_name.items()}}
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.replicated),
                        jax.eval_shape(make))

  def stepper(self, phase: Phase, variables, inputs: Inputs | None = None,
              rng: jax.Array | None = None) -> Stepper:
    """One phase's compiled chunk, to call again and again (benchmarks).

    Each call runs `steps_per_chunk` steps of the phase (all active), continuing
    from the previous call's state, exactly as `run` executes them.
    """
    rng = jax.random.key(0) if rng is None else rng
    before = self.compile_seconds()
    num_steps = self.steps_per_chunk
    static, args, chunk_xs = self._plan(phase, rng, num_steps=num_steps, start=0, first_step=0,
                                        total_steps=num_steps, lr_steps=(0, num_steps))
    xs = chunk_xs(0)
    inputs = self.place(inputs or Inputs())
    variables = self.data.copy(variables)
    state = [dict(params=variables["params"], model_state=model_state(variables),
                  opt=self.new_state(variables["params"], phase.optimizer))]

    def call():
      state[0], metrics = self._chunk(static, state[0], inputs, args, xs)
      return metrics

    call()  # compiles (timed apart) and warms up
    examples = sum(self.stream_batch(s) for s in phase.streams.values())
    return Stepper(call, lambda: state[0], self.compile_seconds() - before, num_steps, examples)

  # ---- one compiled pass over a pool (a method's `prepare`) ----

  def sweep(self, fn, variables, pool: str, inputs: Inputs | None = None,
            hparams: Mapping[str, float] | None = None, batch_size: int | None = None):
    """One in-order, eval-mode pass of `fn(ctx, params, batch) -> (per_example, total)` over a pool.

    `batch` is {"data": ...}, as an objective's single stream sees it. Batches
    of `batch_size` (default the run's; the last one padded and masked). Returns
    (tables, totals): each per-example output scattered into an (N_train, ...)
    array (zeros outside the pool), and each total summed over the batches.
    """
    inputs = self.place(inputs or Inputs())
    hp = self.place(_scalars(hparams or {}))
    pool_N = self.pools[pool]
    static = (self.env, fn, int(pool_N.shape[0]), batch_size or self.batch_size)
    return self.compiled(self._sweep_jit, static, variables, self.train, pool_N, inputs, hp)

  # ---- evaluation ----

  def predict(self, variables, split: str, with_loss: bool = False):
    """Class probabilities (N, C) and features (N, D) of every example of a split (eval mode);
    `with_loss`: also each example's cross-entropy (N,), from the logits."""
    data = self.train if split == "train" else self.test
    n = int(data[1].shape[0])
    return evaluate.predict(self.env, self.place(variables), data, width=self.eval_width,
                            num_batches=-(-n // self.eval_width), with_loss=with_loss)

