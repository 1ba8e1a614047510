"""The compiled programs: a chunk of train steps, a sweep, an edit. Pure functions of (state, inputs).

Each takes an `Env` (static: the model, the device data, the optimizers; one per
run) and arrays only, so `jax.jit` compiles it once per objective and shapes;
every hyperparameter arrives as a traced array.

Where BatchNorm state is threaded through the step: the train state is the pytree
{"params", "model_state", "opt"}. A step hands the objective a `Context` whose
`apply(params, pixels)` runs the model in train mode on the current model state
and keeps each pass's updated state, in call order, as PyTorch's running
statistics change with every `model.train()` forward pass; the step returns the
state after the objective's last pass beside the new parameters. Sweeps and
edits run in eval mode and never change the state. `apply(..., train=False)`
asks for an eval-mode pass inside a step (e.g. a frozen copy of the model).
"""
from __future__ import annotations

import dataclasses
import threading
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from jaxunlearn import augment
from jaxunlearn.device_data import DeviceData
from jaxunlearn.models.base import Model
from jaxunlearn.recipe import Inputs


@dataclasses.dataclass(frozen=True)
class Context:
  """What a compiled step knows besides parameters and batch (built inside the trace)."""
  # apply(params, pixels_BxHxWxC in [0, 1], *, mask=None, train=None) -> (logits, features).
  # mask (B,) marks a padded batch's real rows (BatchNorm statistics skip the rest);
  # train=None is the pass's default mode (train in a step, eval in a sweep or edit).
  apply: Callable
  rng: jax.Array  # this step's key
  progress: jax.Array  # steps done / steps in the run, in [0, 1)
  hp: Mapping[str, jax.Array]
  inputs: Inputs
  num_classes: int

  @property
  def frozen(self):
    return self.inputs.frozen


@dataclasses.dataclass(frozen=True, eq=False)
class Env:
  """What the compiled programs close over (hashed by identity: one compile per run)."""
  model: Model
  data: DeviceData
  transforms: Mapping[str, optax.GradientTransformation]  # optimizer kind -> optax
  augment: str = "none"  # training augmentation of streams that take it (`augment.KINDS`)
  # Incremented each time a program is traced (tests check: once per objective).
  traces: list = dataclasses.field(default_factory=lambda: [0])
  lock: Any = dataclasses.field(default_factory=threading.Lock)

  def traced(self):
    with self.lock:
      self.traces[0] += 1


def _finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _masked(tree, mask):
  return tree if mask is None else jax.tree.map(lambda x, m: x * m.astype(x.dtype), tree, mask)


def context(env: Env, cell: list, key, step, num_steps, hp, inputs, *,
            default_train: bool) -> Context:
  """A Context whose model runs on the state in `cell[0]`; train-mode passes write it back."""
  def apply(params, pixels, *, mask=None, train=None):
    mode = default_train if train is None else train
    x = env.data.preprocess(pixels)
    logits, features, new_state = env.model.apply({"params": params, **cell[0]}, x,
                                                  train=mode, mask_B=mask)
    if mode:
      cell[0] = new_state
    return logits, features

  return Context(apply=apply, rng=jax.random.fold_in(key, step),
                 progress=step.astype(jnp.float32) / jnp.maximum(num_steps, 1), hp=hp,
                 inputs=inputs, num_classes=env.data.num_classes)


def _batches(env: Env, streams, train, inputs, x, key):
  """Each stream's batch of this step; the augmented ones with keys from the step's."""
  batch = {}
  for s_i, (name, augmented) in enumerate(streams):
    idx, mask = x["streams"][name]
    b = env.data.gather(train, idx, mask, inputs.tables)
    if augmented:
      k = jax.random.fold_in(jax.random.fold_in(key, (1 << 30) + s_i), x["step"])
      b["image"] = augment.apply(env.augment, k, b["image"])
    batch[name] = b
  return batch


def run_chunk(env: Env, objective, streams, kind: str, state, train, inputs, args, xs):
  """`steps_per_chunk` steps of one phase in one scan; inactive (padding) steps are skipped.

  streams: ((batch key, augmented), ...), static; state: {"params", "model_state",
  "opt"} (the phase's optimizer state); args: the phase's traced scalars; xs: per
  step "active", "lr", "step" and each stream's (indices, mask).
  """
  env.traced()
  tx = env.transforms[kind]

  def step(state, x):
    batch = _batches(env, streams, train, inputs, x, args["key"])

    def signed(params):
      cell = [state["model_state"]]
      ctx = context(env, cell, args["key"], x["step"], args["num_steps"], args["hp"], inputs,
                    default_train=True)
      loss, aux = objective(ctx, params, batch)
      return args["sign"] * loss, (aux, cell[0])

    params = state["params"]
    (loss, (aux, model_state)), grads = jax.value_and_grad(signed, has_aux=True)(params)
    opt_state = state["opt"]
    opt_state.hyperparams.update(learning_rate=x["lr"], **args["opt_hp"])
    grads = _masked(grads, inputs.update_mask)
    # Weight decay acts inside the update: decay only what may change, and mask the
    # update too, so nothing outside the mask moves and its momentum stays 0.
    updates, new_opt = tx.update(grads, opt_state, _masked(params, inputs.update_mask))
    updates = _masked(updates, inputs.update_mask)
    examples = sum(jnp.sum(m) for _, m in x["streams"].values())
    new = dict(params=optax.apply_updates(params, updates), model_state=model_state, opt=new_opt)
    return new, dict(loss=loss, examples=examples, **aux)

  def skip(state, x):
    # Same output structure as `step`, without computing it.
    out = jax.eval_shape(step, state, x)[1]
    return state, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out)

  # A phase rarely fills its last chunk (stage 1 of two-stage is a single step):
  # cond runs only the taken branch, so padding steps cost nothing.
  state, metrics = jax.lax.scan(lambda st, x: jax.lax.cond(x["active"], step, skip, st, x),
                                state, xs)
  finite = _finite((state["params"], state["model_state"]))
  return state, dict(metrics, params_finite=finite)


def sweep(env: Env, fn, n: int, batch_size: int, variables, train, pool_N, inputs, hp):
  """One in-order, eval-mode pass of `fn(ctx, params, batch) -> (per_example, total)` over a pool.

  Returns (tables, totals): each per-example output scattered into an
  (N_train, ...) array (zeros outside the pool), each total summed over batches.
  """
  env.traced()
  width = env.data.width(batch_size)
  num_train = train[1].shape[0]
  S = -(-n // batch_size)
  idx = jnp.pad(pool_N, (0, S * batch_size - n)).reshape(S, batch_size)
  mask = jnp.pad(jnp.ones((n,), jnp.float32), (0, S * batch_size - n)).reshape(S, batch_size)
  pad = ((0, 0), (0, width - batch_size))
  idx, mask = jnp.pad(idx, pad), jnp.pad(mask, pad)
  params, state = variables["params"], {k: v for k, v in variables.items() if k != "params"}

  def call(i, idx_B, mask_B):
    ctx = context(env, [state], jax.random.key(0), i, S, hp, inputs, default_train=False)
    return fn(ctx, params, {"data": env.data.gather(train, idx_B, mask_B, inputs.tables)})

  def one(carry, x):
    i, (idx_B, mask_B) = x
    per_example, total = call(i, idx_B, mask_B)
    return jax.tree.map(jnp.add, carry, total), per_example

  zero = jax.eval_shape(lambda: call(jnp.int32(0), idx[0], mask[0])[1])
  totals, per_example = jax.lax.scan(
      one, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero), (jnp.arange(S), (idx, mask)))
  target = jnp.where(mask.reshape(-1) > 0, idx.reshape(-1), num_train)  # padding falls off

  def scatter(v):
    v = v.reshape(-1, *v.shape[2:])
    return jnp.zeros((num_train, *v.shape[1:]), v.dtype).at[target].set(v, mode="drop")

  return jax.tree.map(scatter, per_example), totals


def edit(env: Env, edit_fn, variables, inputs, hp):
  """variables with params <- edit_fn(ctx, params) (eval-mode context; the model state is kept)."""
  env.traced()
  state = {k: v for k, v in variables.items() if k != "params"}
  ctx = context(env, [state], jax.random.key(0), jnp.int32(0), jnp.int32(1), hp, inputs,
                default_train=False)
  return {**variables, "params": edit_fn(ctx, variables["params"])}
