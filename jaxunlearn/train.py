"""The one training loop every model and unlearning method runs: the host side.

`Trainer.run` drives a stage's `Recipe` (see `recipe.py`) chunk by chunk: it
plans each phase's batches and learning rates, calls the compiled chunk of
steps (`steps.py`), reads the previous chunk's losses while the next one runs,
moves the progress bar, saves snapshots and resumes from them, and stops on a
non-finite loss. The rest lives in its own module:

  recipe.py         the step contract: Recipe, Phase, Stream, Inputs
  optimizers.py     Optimizer (SGD, Adam, AdamW as PyTorch's) and schedules
  plan.py           a phase's steps, and each chunk's batches, keys and learning rates
  steps.py          the compiled programs (train chunk, sweep, edit) and Context
  device_data.py    the data on the mesh, batch drawing and gathering
  compile_cache.py  compiled programs by signature, and the compile-time clock
  progress_bar.py   the progress bar of a run
  evaluate.py       prediction and metrics

The names a method uses are re-exported here (`train.Phase`, `train.Optimizer`, ...).
The train state is a pytree {"params", "model_state", "opt"}: the model state
(BatchNorm's running statistics; {} for the ViT) rides beside the parameters
through every step, snapshot and checkpoint.
"""
from __future__ import annotations

import dataclasses
import threading
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxunlearn import compile_cache, datasets, evaluate, optimizers, plan, steps
from jaxunlearn.device_data import (DeviceData, chunk_table, epoch_keys,  # noqa: F401
                                    make_mesh, stream_keys)
from jaxunlearn.models.base import Model, model_state
from jaxunlearn.optimizers import Optimizer
from jaxunlearn.progress_bar import ProgressBar
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


def as_model(model) -> Model:
  """A `Model`, or a bare stateless Linen module (its `image_size`, if any, is its input side)."""
  return model if isinstance(model, Model) else Model(model, getattr(model, "image_size", None))


def _steps_per_optimizer(phases: list[Phase], counts: list[int], desc: str) -> dict[str, int]:
  """{optimizer name: its steps in the run}; phases naming one optimizer must agree on it."""
  per_opt: dict[str, int] = {}
  for p, n in zip(phases, counts):
    per_opt[p.optimizer.name] = per_opt.get(p.optimizer.name, 0) + n
    if any(q.optimizer.name == p.optimizer.name and q.optimizer != p.optimizer for q in phases):
      raise ValueError(f"{desc}: phases share optimizer {p.optimizer.name!r} with different settings")
  return per_opt


class _LossLog:
  """A run's losses, read one chunk behind the device so the host never stalls it, checked for
  divergence and shown on the progress bar."""

  def __init__(self, losses: list[float], bar: ProgressBar):
    self.log = {"loss": losses}
    self.bar = bar
    self._pending = None  # the last chunk launched: (metrics, active steps, first step, phase)

  def follow(self, metrics, n_active: int, first_step: int, phase: str) -> None:
    """Logs the previous chunk (its metrics are ready while this one runs), then awaits this one."""
    self.flush()
    self._pending = (metrics, n_active, first_step, phase)

  def flush(self) -> None:
    """Logs the chunk still awaited, if any."""
    if self._pending is not None:
      pending, self._pending = self._pending, None
      self._report(*pending)

  def _report(self, metrics, n_active: int, first_step: int, phase: str) -> None:
    """Logs a finished chunk's losses and moves the bar; raises `Diverged` on a non-finite one."""
    m = jax.device_get(metrics)
    losses_K = np.asarray(m["loss"])[:n_active]
    bad = np.flatnonzero(~np.isfinite(losses_K))
    if len(bad) or not m["params_finite"]:
      step = first_step + (int(bad[0]) if len(bad) else n_active - 1)
      what = f"loss {losses_K[bad[0]]}" if len(bad) else "non-finite parameters"
      raise Diverged(f"{phase}: {what} at step {step}; lower the learning rate or the "
                     "number of epochs", step=step, phase=phase)
    self.log["loss"].extend(float(v) for v in losses_K)
    self.bar.advance(losses_K, int(np.sum(np.asarray(m["examples"])[:n_active])))


class _RunContext:
  """Where one `Trainer.run` stands (from the start or a snapshot), its arrays between phases,
  the steps each optimizer has taken, and its snapshots; `losses` logs its chunks."""

  def __init__(self, trainer: Trainer, phases: list[Phase], variables, desc: str, *,
               bar_position: int, snapshots, resume: dict | None):
    self.phases, self.desc, self.snapshots = phases, desc, snapshots
    # The run's step count and each optimizer's, for progress and learning-rate schedules.
    self.counts = [trainer.steps_in(p) for p in phases]
    self.total = sum(self.counts)
    self.per_opt = _steps_per_optimizer(phases, self.counts, desc)
    self.params, self.state = variables["params"], model_state(variables)
    self.opt_states: dict[str, Any] = {}  # by optimizer name; the running phase's is out
    self.start = (0, 0)  # (phase, its steps done) the run starts from
    if resume:
      self.start = (resume["phase"], resume["step"])
      arrays = resume["arrays"]
      self.params, self.state = arrays["params"], arrays["model_state"]
      self.opt_states = dict(arrays["opt"])
    self.opt_done = dict.fromkeys(self.per_opt, 0)  # steps each optimizer has taken
    for p, n in zip(phases[:self.start[0]], self.counts[:self.start[0]]):
      self.opt_done[p.optimizer.name] += n
    self.done = sum(self.counts[:self.start[0]])  # steps of the run before the current phase
    losses = list(resume["loss"]) if resume else []
    self.losses = _LossLog(losses, ProgressBar(
        self.total, initial=len(losses), desc=desc, enabled=trainer.progress and bool(phases),
        position=bar_position))

  def variables(self):
    """The run's variables ({"params", ...model state}) after its last finished phase."""
    return {"params": self.params, **self.state}

  def snapshot_if_due(self, p_i: int, step: int, train_state) -> None:
    """Saves a snapshot before phase `p_i`'s chunk from `step` when one is due (never where the
    run started)."""
    if self.snapshots is None or (p_i, step) == self.start or not self.snapshots.due():
      return
    self.losses.flush()  # the log must hold every step before the snapshot
    name = self.phases[p_i].optimizer.name
    self.snapshots.save({"phase": p_i, "step": step},
                        {"params": train_state["params"], "model_state": train_state["model_state"],
                         "opt": {**self.opt_states, name: train_state["opt"]}}, self.losses.log)

  def end_phase(self, p_i: int, train_state) -> None:
    """Logs phase `p_i`'s last chunk, takes back its final state and counts its steps as done."""
    self.losses.flush()
    name, n = self.phases[p_i].optimizer.name, self.counts[p_i]
    self.params, self.state = train_state["params"], train_state["model_state"]
    self.opt_states[name] = train_state["opt"]
    self.opt_done[name] += n
    self.done += n


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
    return plan.stream_batch(stream, self.batch_size)

  def steps_in(self, phase: Phase) -> int:
    return plan.steps_in(phase, self.pools, self.batch_size)

  def new_state(self, params, optimizer: Optimizer):
    """A fresh optimizer state for `params`, replicated."""
    opt_state = optimizers.transform(optimizer.kind).init(params)
    opt_state.hyperparams.update(learning_rate=jnp.float32(optimizer.learning_rate),
                                 **optimizer.hyperparams())
    return self.place(opt_state)

  def _plan(self, phase: Phase, rng, **kwargs):
    """What a phase's chunks need: (static key, traced args, chunk_xs), as `plan.chunk_inputs`
    takes `kwargs` (the phase's steps and where it starts)."""
    args, chunk_xs = plan.chunk_inputs(self.data, self.compiled, phase, rng,
                                       batch_size=self.batch_size, **kwargs)
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
    run = _RunContext(self, recipe.phases, variables, desc, bar_position=bar_position,
                      snapshots=snapshots, resume=resume)
    for p_i in range(run.start[0], len(recipe.phases)):
      self._run_phase(run, p_i, rng, inputs)
    run.losses.bar.close()
    variables = self._edit(recipe, run.variables(), inputs, desc, step=run.done)
    log = run.losses.log
    log["compile_seconds"] = self.compile_seconds() - compile_before
    return variables, log

  def _run_phase(self, run: _RunContext, p_i: int, rng: jax.Array, inputs: Inputs) -> None:
    """Runs phase `p_i` chunk by chunk from where `run` stands; leaves its end state in `run`."""
    phase, num_steps, K = run.phases[p_i], run.counts[p_i], self.steps_per_chunk
    opt = phase.optimizer
    if opt.name not in run.opt_states:
      run.opt_states[opt.name] = self.new_state(run.params, opt)
    train_state = dict(params=run.params, model_state=run.state, opt=run.opt_states.pop(opt.name))
    first = run.start[1] if p_i == run.start[0] else 0  # the phase's steps done
    static, args, chunk_xs = self._plan(
        phase, jax.random.fold_in(rng, p_i), num_steps=num_steps, start=first,
        first_step=run.done, total_steps=run.total,
        lr_steps=(run.opt_done[opt.name], run.per_opt[opt.name]))
    num_chunks = -(-(num_steps - first) // K)
    if len(run.phases) > 1:
      run.losses.bar.phase(phase.name)
    for c in range(num_chunks):
      self._stop_if_cancelled(run.desc)
      step = first + c * K  # the chunk's first step in the phase
      run.snapshot_if_due(p_i, step, train_state)
      train_state, metrics = self._chunk(static, train_state, inputs, args, chunk_xs(c))
      run.losses.follow(metrics, min(K, num_steps - step), run.done + step, phase.name)
    self._stop_if_cancelled(run.desc)  # before its last chunk's losses are read
    run.end_phase(p_i, train_state)

  def _stop_if_cancelled(self, desc: str) -> None:
    if self.cancel.is_set():
      raise Cancelled(f"{desc}: stopped because another stage failed")

  def _edit(self, recipe: Recipe, variables, inputs: Inputs, desc: str, *, step: int):
    """`variables` after the recipe's edit program, if it has one (it runs after the phases)."""
    if recipe.edit is None:
      return variables
    hp = self.place(plan.scalars(recipe.edit_hparams))
    variables = self.compiled(self._edit_jit, (self.env, recipe.edit), variables, inputs, hp)
    if not steps._finite(variables["params"]):
      raise Diverged(f"{desc}: non-finite parameters after its edit", step=step, phase="edit")
    return variables

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
    hp = self.place(plan.scalars(hparams or {}))
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

