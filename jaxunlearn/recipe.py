"""The step contract: what a method hands the training loop (`Recipe`, `Phase`, `Stream`, `Inputs`).

A stage is a `Recipe`: an optional `prepare` sweep (compiled, once, e.g. a
saliency mask or a teacher's logits), a list of `Phase`s, and an optional
`edit` of the final parameters (methods that do not train). A phase draws
batches from named `Stream`s over subsets ("pools") of the training set, with
the study's epoch semantics: reshuffled every epoch, last partial batch kept
(padded and masked, never dropped, never recompiled for).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax

from jaxunlearn.optimizers import Optimizer

Objective = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class Stream:
  """Batches from one pool of training examples."""
  pool: str  # "all", "forget" or "retain"
  # Passes over the pool that set the phase's length. None: a stream that
  # follows the driving one and restarts (reshuffled) whenever it runs out.
  epochs: int | None = None
  # Stop the phase after this many batches (stage 1 of two-stage takes one).
  max_steps: int | None = None
  # Examples per step of this stream; None: the recipe's, else the run's batch size.
  batch_size: int | None = None
  # Whether the run's training augmentation (config.data.augment) applies to its batches.
  augment: bool = True


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

  frozen: arrays the objective reads but never trains (ctx.frozen), e.g. importances.
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
  """How one stage turns its starting model into its result."""
  phases: list[Phase]
  # prepare(trainer, variables) -> Inputs, before the phases (e.g. via `Trainer.sweep`).
  prepare: Callable[[Any, Any], Inputs] | None = None
  # edit(ctx, params) -> params after the phases, compiled (ctx.hp = edit_hparams).
  edit: Callable[..., Any] | None = None
  edit_hparams: Mapping[str, float] = dataclasses.field(default_factory=dict)

  @property
  def pools(self) -> set[str]:
    """The training pools its streams draw from (part of what makes a stage itself)."""
    return {s.pool for p in self.phases for s in p.streams.values()}


def with_batch_size(recipe: Recipe, batch_size: int | None) -> Recipe:
  """The recipe with `batch_size` for every stream that names none (None or 0: unchanged)."""
  if not batch_size:
    return recipe
  def fill(s: Stream) -> Stream:
    return s if s.batch_size else dataclasses.replace(s, batch_size=batch_size)
  phases = [dataclasses.replace(p, streams={k: fill(s) for k, s in p.streams.items()})
            for p in recipe.phases]
  return dataclasses.replace(recipe, phases=phases)
