"""The one training loop every model and unlearning method runs.

A stage is a `Recipe`: an optional `prepare` sweep (compiled, once, e.g. a
saliency mask or a teacher's logits), a list of `Phase`s, and an optional
`edit` of the final parameters (methods that do not train). A phase draws
batches from named `Stream`s over subsets ("pools") of the training set, with
the study's epoch semantics: reshuffled every epoch, last partial batch kept
(padded and masked, never dropped, never recompiled for).

The compiled step hands the objective one `Context`: the model on float pixels,
a per-step rng, the run's progress, the phase's hyperparameters as traced
scalars (changing one never recompiles) and the method's read-only `Inputs`
(frozen parameters, an update mask, per-example tables looked up by each
batch's example indices).

Everything in the hot loop stays on the devices: the training images live there
as uint8, batch indices are drawn there, and `steps_per_chunk` steps run as one
compiled `lax.scan`. The batch axis is split over a ("data",) mesh of all devices
and parameters are replicated, so the same code is data-parallel on 1 or N devices.
"""
from __future__ import annotations

import dataclasses
import functools
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


class Diverged(FloatingPointError):
  """A run whose loss or parameters became non-finite (at `step`, in `phase`)."""

  def __init__(self, message: str, *, step: int, phase: str):
    super().__init__(message)
    self.step, self.phase = step, phase


def _finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


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
class Optimizer:
  """SGD as PyTorch's `torch.optim.SGD` (weight decay added to the gradient, then momentum).

  Phases of one run that name the same optimizer share its state (momentum). Its
  values are traced inputs of the step: any learning rate, momentum or weight
  decay runs on the same compiled step.
  """
  learning_rate: float
  momentum: float = 0.9
  weight_decay: float = 0.0
  # Cosine decay from learning_rate to this over all steps of the phases using this
  # optimizer (optax.cosine_decay_schedule); None keeps the rate constant.
  final_learning_rate: float | None = None
  name: str = "sgd"

  def schedule(self, num_steps: int) -> optax.Schedule:
    if self.final_learning_rate is None:
      return optax.constant_schedule(self.learning_rate)
    return optax.cosine_decay_schedule(self.learning_rate, max(num_steps, 1),
                                       alpha=self.final_learning_rate / self.learning_rate)


@dataclasses.dataclass(frozen=True)
class Phase:
  name: str
  objective: Objective  # objective(ctx, params, batch) -> (loss, aux metrics)
  streams: Mapping[str, Stream]  # batch key (what the objective reads) -> stream
  optimizer: Optimizer
  # The objective's own hyperparameters (ctx.hp): traced scalars, not constants.
  hparams: Mapping[str, float] = dataclasses.field(default_factory=dict)
  # +1 minimises the objective, -1 maximises it (gradient ascent). Traced too,
  # so both directions share one compiled step.
  sign: float = 1.0


@dataclasses.dataclass(frozen=True)
class Inputs:
  """Read-only inputs of a method's steps (a pytree; empty by default).

  frozen: parameters the objective reads but never trains (ctx.frozen), e.g. a teacher.
  tables: per-example arrays over the whole training set, (N, ...); each batch
    carries the rows of its examples under the same key (batch[stream][key]).
  update_mask: a 0/1 pytree like the parameters: gradients and updates are
    multiplied by it, so parameters (and momentum) outside it never change.
  """
  frozen: Any = None
  tables: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  update_mask: Any = None


jax.tree_util.register_dataclass(Inputs, data_fields=["frozen", "tables", "update_mask"],
                                 meta_fields=[])


@dataclasses.dataclass(frozen=True)
class Recipe:
  """How one stage turns its starting parameters into its result."""
  phases: list[Phase]
  # prepare(trainer, params) -> Inputs, before the phases (e.g. via `Trainer.sweep`).
  prepare: Callable[["Trainer", Any], Inputs] | None = None
  # edit(ctx, params) -> params after the phases, compiled (ctx.hp = edit_hparams).
  edit: Callable[..., Any] | None = None
  edit_hparams: Mapping[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Context:
  """What a compiled step knows besides parameters and batch (built inside the trace)."""
  apply: Callable  # apply(params, pixels_BxHxWxC in [0, 1]) -> (logits, features)
  rng: jax.Array  # this step's key
  progress: jax.Array  # steps done / steps in the run, in [0, 1)
  hp: Mapping[str, jax.Array]
  inputs: Inputs
  num_classes: int

  @property
  def frozen(self):
    return self.inputs.frozen


@dataclasses.dataclass(frozen=True)
class Stepper:
  """A compiled chunk of one phase (`Trainer.stepper`): call it to run `steps` more steps."""
  call: Callable[[], Any]  # returns the chunk's per-step metrics (on the device)
  state: Callable[[], Any]  # the current (params, optimizer state)
  compile_seconds: float
  steps: int  # steps per call
  examples_per_step: int  # images through the model per step

  def __call__(self):
    return self.call()


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


def _sgd(learning_rate, momentum, weight_decay):
  # torch.optim.SGD: g + wd * p, then the momentum buffer, then -lr.
  return optax.chain(optax.add_decayed_weights(weight_decay), optax.trace(decay=momentum),
                     optax.scale_by_learning_rate(learning_rate))


def _scalars(hparams: Mapping[str, float]) -> dict[str, np.float32]:
  """Hyperparameters as float32 scalars: traced inputs of a compiled step, never constants."""
  return {k: np.float32(v) for k, v in hparams.items()}


def _masked(tree, mask):
  return tree if mask is None else jax.tree.map(lambda x, m: x * m.astype(x.dtype), tree, mask)


class Trainer:
  """Holds the device-resident data and the compiled steps of one pipeline run."""

  def __init__(self, model, data: datasets.Dataset, pools: Mapping[str, np.ndarray], *,
               batch_size: int, steps_per_chunk: int, eval_batch_size: int, mesh=None,
               progress: bool = True):
    """`pools` maps a pool name ("all", "forget", "retain") to training-set indices."""
    self.model = model
    self.num_classes = data.num_classes
    self.mesh = mesh or make_mesh()
    self.batch_size = batch_size
    n_dev = self.mesh.devices.size
    self.width = -(-batch_size // n_dev) * n_dev
    self.eval_width = -(-eval_batch_size // n_dev) * n_dev
    self.steps_per_chunk = steps_per_chunk
    self.progress = progress
    # Hyperparameters live in the optimizer state: every SGD setting shares one compile.
    self.tx = optax.inject_hyperparams(_sgd)(learning_rate=0.0, momentum=0.0, weight_decay=0.0)
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharded = NamedSharding(self.mesh, P("data"))
    self.table_sharded = NamedSharding(self.mesh, P(None, "data"))
    self._pixel_max = float(data.pixel_max)
    # Every process holds the whole (small) data set, so each one hands in all of
    # it; on one host this is a plain device_put.
    self.put = lambda x: jax.make_array_from_process_local_data(self.replicated, np.asarray(x))
    self.train = (self.put(data.train_images), self.put(data.train_labels))
    self.test = (self.put(data.test_images), self.put(data.test_labels))
    self.num_train = len(data.train_labels)
    self.pools = {name: self.put(np.asarray(idx, np.int32)) for name, idx in pools.items()}
    self._compiled: dict[Any, Any] = {}
    self._lock = threading.Lock()  # stages may run in threads (config.concurrent_stages)
    self._compile_locks: dict[Any, threading.Lock] = {}
    self._local = threading.local()  # per-thread compile-time stopwatch
    # Set to stop every run of this trainer at its next chunk (a sibling stage failed).
    self.cancel = threading.Event()
    self._predict_fn = jax.jit(self._predict, static_argnames=("num_batches",))
    self._copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree), out_shardings=self.replicated)
    self._chunk_jit = jax.jit(self._run_chunk, static_argnums=(0, 1), donate_argnums=(2,),
                              out_shardings=self.replicated)
    self._sweep_jit = jax.jit(self._sweep, static_argnums=(0, 1), out_shardings=self.replicated)
    self._edit_jit = jax.jit(self._edit, static_argnums=(0,), out_shardings=self.replicated)
    # One chunk of a stream's batch indices and masks, drawn on the devices.
    self._table_jit = jax.jit(
        functools.partial(chunk_table, batch_size=batch_size, width=self.width,
                          chunk=steps_per_chunk), out_shardings=self.table_sharded)
    # Incremented each time a step function is traced (tests check: once per objective).
    self.num_traces = 0

  # ---- the model as the steps see it ----

  def pixels(self, images_BxHxWxC):
    """Stored uint8 images -> float pixels in [0, 1] at their stored size."""
    return images_BxHxWxC.astype(jnp.float32) / self._pixel_max

  def apply(self, params, pixels_BxHxWxC):
    """The model on float pixels in [0, 1]: resize and normalise, then the ViT."""
    x = datasets.normalize(pixels_BxHxWxC, self.model.image_size)
    x = jax.lax.with_sharding_constraint(x, self.batch_sharded)
    return self.model.apply({"params": params}, x)

  def place(self, tree):
    """Replicate a pytree (parameters, method inputs) over the mesh."""
    if jax.process_count() > 1:
      # Multi-host: device_put takes no PRNG keys onto other processes' devices (jax
      # 0.10); the compiled copy takes anything, each process handing in its equal copy.
      return self._copy(tree)
    return jax.device_put(tree, self.replicated)

  # ---- compiling, with the compile time kept apart from the run time ----

  def _aot(self, jitted, static: tuple, *args):
    """`jitted(*static, *args)` compiled once per signature; compile time -> this thread's clock."""
    leaves, treedef = jax.tree.flatten(args)
    key = (jitted, static, treedef, tuple((np.shape(x), jnp.result_type(x)) for x in leaves))
    if key not in self._compiled:
      # Compiling, or waiting for another thread's compile of the same step, is compile time.
      t0 = time.perf_counter()
      with self._lock:
        lock = self._compile_locks.setdefault(key, threading.Lock())
      with lock:
        if key not in self._compiled:
          self._compiled[key] = jitted.lower(*static, *args).compile()
      self._local.compile_s = getattr(self._local, "compile_s", 0.0) + time.perf_counter() - t0
    return self._compiled[key](*args)

  def compile_seconds(self) -> float:
    """Seconds this thread has spent compiling (the stages read its change)."""
    return getattr(self._local, "compile_s", 0.0)

  # ---- training ----

  def steps_in(self, phase: Phase) -> int:
    drivers = [s for s in phase.streams.values() if s.epochs is not None]
    if len(drivers) != 1:
      raise ValueError(f"phase {phase.name!r} needs exactly one stream with epochs set")
    s = drivers[0]
    steps = s.epochs * -(-int(self.pools[s.pool].shape[0]) // self.batch_size)
    return min(steps, s.max_steps) if s.max_steps is not None else steps

  def _context(self, key, step, num_steps, hp, inputs):
    return Context(apply=self.apply, rng=jax.random.fold_in(key, step),
                   progress=step.astype(jnp.float32) / jnp.maximum(num_steps, 1), hp=hp,
                   inputs=inputs, num_classes=self.num_classes)

  def _batch(self, train, idx_B, mask_B, inputs: Inputs):
    images_N, labels_N = train
    return dict(image=self.pixels(images_N[idx_B]), label=labels_N[idx_B], mask=mask_B,
                index=idx_B, **{k: t[idx_B] for k, t in inputs.tables.items()})

  def _run_chunk(self, objective, stream_names, state, train, inputs, args, xs):
    """`steps_per_chunk` steps in one scan; inactive (padding) steps are skipped."""
    del stream_names  # static: part of the compile key
    with self._lock:
      self.num_traces += 1
    def step(state, x):
      params, opt_state = state
      batch = {name: self._batch(train, idx, m, inputs) for name, (idx, m) in x["streams"].items()}
      ctx = self._context(args["key"], x["step"], args["num_steps"], args["hp"], inputs)

      def signed(params):
        loss, aux = objective(ctx, params, batch)
        return args["sign"] * loss, aux

      (loss, aux), grads = jax.value_and_grad(signed, has_aux=True)(params)
      opt_state.hyperparams.update(learning_rate=x["lr"], momentum=args["momentum"],
                                   weight_decay=args["weight_decay"])
      grads = _masked(grads, inputs.update_mask)
      # Weight decay acts inside the update: decay only what may change, and mask the
      # update too, so nothing outside the mask moves and its momentum stays 0.
      updates, new_opt = self.tx.update(grads, opt_state, _masked(params, inputs.update_mask))
      updates = _masked(updates, inputs.update_mask)
      examples = sum(jnp.sum(m) for _, m in x["streams"].values())
      return (optax.apply_updates(params, updates), new_opt), dict(
          loss=loss, examples=examples, **aux)

    def skip(state, x):
      # Same output structure as `step`, without computing it.
      out = jax.eval_shape(step, state, x)[1]
      return state, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out)

    # A phase rarely fills its last chunk (stage 1 of two-stage is a single step):
    # cond runs only the taken branch, so padding steps cost nothing.
    state, metrics = jax.lax.scan(lambda st, x: jax.lax.cond(x["active"], step, skip, st, x),
                                  state, xs)
    return state, dict(metrics, params_finite=_finite(state[0]))

  def new_state(self, params, optimizer: Optimizer):
    """A fresh optimizer state for `params`, replicated."""
    opt_state = self.tx.init(params)
    opt_state.hyperparams.update(learning_rate=jnp.float32(optimizer.learning_rate),
                                 momentum=jnp.float32(optimizer.momentum),
                                 weight_decay=jnp.float32(optimizer.weight_decay))
    return self.place(opt_state)

  def _plan(self, phase: Phase, rng, *, num_steps: int, first_step: int, total_steps: int,
            lr_steps: tuple[int, int]):
    """What a phase's chunks need: static key, traced args, per-chunk inputs.

    Returns (static, args, chunk_xs) with chunk_xs(c) the scanned inputs of chunk c.
    `lr_steps` = (steps its optimizer has taken, steps it takes in the run).
    """
    K, opt = self.steps_per_chunk, phase.optimizer
    num_chunks = max(1, -(-num_steps // K))
    streams = {}  # batch key -> (epoch keys, pool)
    for s_i, (name, s) in enumerate(sorted(phase.streams.items())):
      pool = self.pools[s.pool]
      keys = stream_keys(jax.random.fold_in(rng, s_i), int(pool.shape[0]),
                         batch_size=self.batch_size, num_chunks=num_chunks, chunk=K)
      streams[name] = (keys, pool)
    all_steps = np.arange(num_chunks * K)
    active = (all_steps < num_steps).reshape(num_chunks, K)
    lr = np.broadcast_to(np.asarray(opt.schedule(lr_steps[1])(lr_steps[0] + all_steps), np.float32),
                         all_steps.shape).reshape(num_chunks, K)
    step_no = (first_step + all_steps).astype(np.int32).reshape(num_chunks, K)
    args = self.place(dict(
        key=jax.random.fold_in(rng, 1 << 20), num_steps=np.int32(total_steps),
        sign=np.float32(phase.sign), momentum=np.float32(opt.momentum),
        weight_decay=np.float32(opt.weight_decay),
        hp=_scalars(phase.hparams)))

    def chunk_xs(c):
      tables = {name: self._aot(self._table_jit, (), keys, pool, np.int32(c), np.int32(num_steps))
                for name, (keys, pool) in streams.items()}
      return dict(active=active[c], lr=lr[c], step=step_no[c], streams=tables)

    return (phase.objective, tuple(sorted(phase.streams))), args, chunk_xs

  def prepare(self, recipe: Recipe, params) -> Inputs:
    """The recipe's method inputs (its prepare sweep), replicated; empty without one."""
    return self.place(recipe.prepare(self, params)) if recipe.prepare else Inputs()

  def run(self, params, recipe: Recipe | list[Phase], rng: jax.Array, desc: str,
          bar_position: int = 0, *, snapshots=None, resume: dict | None = None):
    """Runs a stage's recipe from `params`; returns (params, log).

    The log has the loss of every step and `compile_seconds`, the part of the
    wall time spent compiling. Thread-safe: independent runs may go on in
    parallel threads (`bar_position` keeps their progress bars on separate lines).

    `snapshots` (optional) is asked at every chunk boundary whether a snapshot is
    `due()`; if so its `save(position, arrays, log)` gets the full training state:
    position {"phase", "chunk"} (the next chunk to run), arrays {"params", "opt":
    {optimizer name: state}} and the losses so far. `resume` (such a snapshot, as
    `snapshot_template` restores it, plus "loss") continues from there: the same
    steps, batches and keys as an uninterrupted run, so the same result.
    A non-finite loss or parameter raises `Diverged` with the step.
    """
    if not isinstance(recipe, Recipe):
      recipe = Recipe(list(recipe))
    compile_before = self.compile_seconds()
    params = self._copy(params)  # the chunks donate their state; the caller keeps its params
    inputs = self.prepare(recipe, params)  # from the stage's start: deterministic on resume too
    log = {"loss": list(resume["loss"]) if resume else []}
    phases = recipe.phases
    # The run's step count and each optimizer's, for progress and learning-rate schedules.
    steps = [self.steps_in(p) for p in phases]
    per_opt: dict[str, int] = {}
    for p, n in zip(phases, steps):
      per_opt[p.optimizer.name] = per_opt.get(p.optimizer.name, 0) + n
      if any(q.optimizer.name == p.optimizer.name and q.optimizer != p.optimizer for q in phases):
        raise ValueError(f"{desc}: phases share optimizer {p.optimizer.name!r} with different settings")
    opt_states: dict[str, Any] = {}
    start_phase, start_chunk = 0, 0
    if resume:
      start_phase, start_chunk = resume["phase"], resume["chunk"]
      params, opt_states = resume["arrays"]["params"], dict(resume["arrays"]["opt"])
    opt_done = dict.fromkeys(per_opt, 0)
    for p, n in zip(phases[:start_phase], steps[:start_phase]):
      opt_done[p.optimizer.name] += n
    done, K = sum(steps[:start_phase]), self.steps_per_chunk
    bar = tqdm(total=sum(steps), initial=len(log["loss"]), desc=desc,
               disable=not self.progress or not phases, unit="step", dynamic_ncols=True,
               leave=True, position=bar_position)
    t0, seen = time.perf_counter(), 0
    for p_i, (phase, num_steps) in enumerate(zip(phases, steps)):
      if p_i < start_phase:
        continue
      opt = phase.optimizer
      if opt.name not in opt_states:
        opt_states[opt.name] = self.new_state(params, opt)
      state = (params, opt_states.pop(opt.name))
      static, args, chunk_xs = self._plan(
          phase, jax.random.fold_in(rng, p_i), num_steps=num_steps, first_step=done,
          total_steps=sum(steps), lr_steps=(opt_done[opt.name], per_opt[opt.name]))
      num_chunks = -(-num_steps // K)
      if len(phases) > 1:
        bar.set_description(f"{desc}/{phase.name}")
      pending = None
      first = start_chunk if p_i == start_phase else 0
      for c in range(first, num_chunks + 1):
        if self.cancel.is_set():
          raise Cancelled(f"{desc}: stopped because another stage failed")
        if (snapshots is not None and c < num_chunks and (p_i, c) != (start_phase, start_chunk)
            and snapshots.due()):
          if pending is not None:  # the log must hold every step before the snapshot
            seen += self._report(pending, bar, phase, log, t0, seen, done + c * K)
            pending = None
          snapshots.save({"phase": p_i, "chunk": c},
                         {"params": state[0], "opt": {**opt_states, opt.name: state[1]}}, log)
        if c < num_chunks:
          state, metrics = self._aot(self._chunk_jit, static, state, self.train, inputs, args,
                                     chunk_xs(c))
        # Read the previous chunk's metrics while this one runs: no host stall.
        if pending is not None:
          seen += self._report(pending, bar, phase, log, t0, seen, done + min(c * K, num_steps))
        pending = (metrics, min(K, num_steps - c * K), done + c * K) if c < num_chunks else None
      params, opt_states[opt.name] = state
      opt_done[opt.name] += num_steps
      done += num_steps
    bar.close()
    if recipe.edit is not None:
      hp = self.place(_scalars(recipe.edit_hparams))
      params = self._aot(self._edit_jit, (recipe.edit,), params, inputs, hp)
      if not _finite(params):
        raise Diverged(f"{desc}: non-finite parameters after its edit", step=done, phase="edit")
    log["compile_seconds"] = self.compile_seconds() - compile_before
    return params, log

  def snapshot_template(self, params, optimizer_names: dict[str, "Optimizer"]):
    """Abstract arrays (shapes, dtypes, shardings) of a snapshot, to restore one."""
    make = lambda: {"params": params,
                    "opt": {n: self.new_state(params, o) for n, o in optimizer_names.items()}}
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.replicated),
                        jax.eval_shape(make))

  def stepper(self, phase: Phase, params, inputs: Inputs | None = None,
              rng: jax.Array | None = None) -> "Stepper":
    """One phase's compiled chunk, to call again and again (benchmarks).

    Each call runs `steps_per_chunk` steps of the phase (all active), continuing
    from the previous call's state, exactly as `run` executes them.
    """
    rng = jax.random.key(0) if rng is None else rng
    before = self.compile_seconds()
    num_steps = self.steps_per_chunk
    static, args, chunk_xs = self._plan(phase, rng, num_steps=num_steps, first_step=0,
                                        total_steps=num_steps, lr_steps=(0, num_steps))
    xs = chunk_xs(0)
    inputs = self.place(inputs or Inputs())
    state = [(self._copy(params), self.new_state(params, phase.optimizer))]

    def call():
      state[0], metrics = self._aot(self._chunk_jit, static, state[0], self.train, inputs, args, xs)
      return metrics

    call()  # compiles (timed apart) and warms up
    examples = self.batch_size * len(phase.streams)
    return Stepper(call, lambda: state[0], self.compile_seconds() - before, num_steps, examples)

  def _edit(self, edit, params, inputs, hp):
    ctx = self._context(jax.random.key(0), jnp.int32(0), jnp.int32(1), hp, inputs)
    return edit(ctx, params)

  def _report(self, pending, bar, phase, log, t0, seen, steps_done):
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

  # ---- one compiled pass over a pool (a method's `prepare`) ----

  def sweep(self, fn, params, pool: str, inputs: Inputs | None = None,
            hparams: Mapping[str, float] | None = None):
    """One in-order pass of `fn(ctx, params, batch) -> (per_example, total)` over a pool.

    `batch` is {"data": ...}, as an objective's single stream sees it.
    Batches of `batch_size` (the last one padded and masked). Returns
    (tables, totals): each per-example output scattered into an (N_train, ...)
    array (zeros outside the pool), and each total summed over the batches.
    """
    inputs = self.place(inputs or Inputs())
    hp = self.place(_scalars(hparams or {}))
    pool_N = self.pools[pool]
    return self._aot(self._sweep_jit, (fn, int(pool_N.shape[0])), params, self.train, pool_N,
                     inputs, hp)

  def _sweep(self, fn, n, params, train, pool_N, inputs, hp):
    with self._lock:
      self.num_traces += 1
    S = -(-n // self.batch_size)
    idx = jnp.pad(pool_N, (0, S * self.batch_size - n)).reshape(S, self.batch_size)
    mask = jnp.pad(jnp.ones((n,), jnp.float32), (0, S * self.batch_size - n))
    mask = mask.reshape(S, self.batch_size)
    pad = ((0, 0), (0, self.width - self.batch_size))
    idx, mask = jnp.pad(idx, pad), jnp.pad(mask, pad)
    def one(carry, x):
      i, (idx_B, mask_B) = x
      ctx = self._context(jax.random.key(0), i, S, hp, inputs)
      per_example, total = fn(ctx, params, {"data": self._batch(train, idx_B, mask_B, inputs)})
      return jax.tree.map(jnp.add, carry, total), per_example

    zero = jax.eval_shape(lambda: fn(self._context(jax.random.key(0), jnp.int32(0), S, hp, inputs),
                                     params, {"data": self._batch(train, idx[0], mask[0], inputs)})[1])
    totals, per_example = jax.lax.scan(
        one, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero),
        (jnp.arange(S), (idx, mask)))
    flat_idx = idx.reshape(-1)
    flat_mask = mask.reshape(-1) > 0
    target = jnp.where(flat_mask, flat_idx, self.num_train)  # padding rows fall off the end

    def scatter(v):
      v = v.reshape(-1, *v.shape[2:])
      return jnp.zeros((self.num_train, *v.shape[1:]), v.dtype).at[target].set(v, mode="drop")

    return jax.tree.map(scatter, per_example), totals

  # ---- evaluation ----

  def _predict(self, params, data, *, num_batches: int):
    images_N, labels_N = data
    n = labels_N.shape[0]
    idx = jnp.minimum(jnp.arange(num_batches * self.eval_width), n - 1)
    idx = jax.lax.with_sharding_constraint(idx.reshape(num_batches, -1), self.table_sharded)

    def one(idx_B):
      logits, feats = self.apply(params, self.pixels(images_N[idx_B]))
      return jax.nn.softmax(logits, axis=-1), feats

    probs, feats = jax.lax.map(one, idx)
    return probs.reshape(-1, probs.shape[-1])[:n], feats.reshape(-1, feats.shape[-1])[:n]

  def predict(self, params, split: str):
    """Class probabilities (N, C) and features (N, D) of every example of a split."""
    data = self.train if split == "train" else self.test
    n = int(data[1].shape[0])
    return self._predict_fn(self.place(params), data, num_batches=-(-n // self.eval_width))
