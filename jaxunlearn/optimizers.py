"""Optimizers with PyTorch's semantics, and learning-rate schedules, as the step uses them.

An `Optimizer` is a description (kind, values, schedule); `transform(kind)` is
the optax transformation a compiled step runs. Every value is an injected
hyperparameter (`optax.inject_hyperparams`), so any learning rate, momentum,
beta or weight decay runs on the step compiled for its kind: only the kind
("sgd", "adam", "adamw") is part of a compile. The learning rate of every step
comes from `Optimizer.learning_rates`, computed on the host per chunk and fed
to the step as an array (no schedule is traced into the program).

PyTorch semantics (tests/test_optimizers.py checks each against torch.optim):
  sgd    torch.optim.SGD: g + wd * p, then the momentum buffer b = mu b + g, then -lr b.
  adam   torch.optim.Adam: weight decay added to the gradient (L2, "coupled"), then
         Adam with bias correction, eps added to sqrt(v_hat).
  adamw  torch.optim.AdamW: p -= lr * wd * p (decoupled), plus the Adam step.
`momentum` is SGD's momentum and Adam's beta1 (its first-moment decay).
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np
import optax

KINDS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "step")


def _sgd(learning_rate, momentum, weight_decay):
  return optax.chain(optax.add_decayed_weights(weight_decay), optax.trace(decay=momentum),
                     optax.scale_by_learning_rate(learning_rate))


def _adam(learning_rate, momentum, beta2, eps, weight_decay):
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.scale_by_adam(b1=momentum, b2=beta2, eps=eps),
                     optax.scale_by_learning_rate(learning_rate))


def _adamw(learning_rate, momentum, beta2, eps, weight_decay):
  # -lr * (adam + wd * p) = torch's p * (1 - lr * wd) - lr * adam.
  return optax.chain(optax.scale_by_adam(b1=momentum, b2=beta2, eps=eps),
                     optax.add_decayed_weights(weight_decay),
                     optax.scale_by_learning_rate(learning_rate))


_FACTORIES = {"sgd": _sgd, "adam": _adam, "adamw": _adamw}


def transform(kind: str) -> optax.GradientTransformation:
  """The kind's optax transformation with every hyperparameter injected (values set per step)."""
  fn = _FACTORIES[kind]
  names = fn.__code__.co_varnames[:fn.__code__.co_argcount]
  return optax.inject_hyperparams(fn)(**dict.fromkeys(names, 0.0))


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """One optimizer of a stage: its kind, values and learning-rate schedule.

  Phases of one run that name the same optimizer (`name`) share its state
  (momentum, Adam's moments) and its schedule, which runs over all their steps.
  """
  learning_rate: float
  momentum: float = 0.9  # SGD's momentum; Adam's beta1
  weight_decay: float = 0.0
  # Cosine decay from learning_rate to this; setting it alone selects "cosine".
  final_learning_rate: float | None = None
  name: str = "sgd"
  kind: str = "sgd"  # one of KINDS
  beta2: float = 0.999  # adam, adamw
  eps: float = 1e-8  # adam, adamw
  # "constant", "cosine" (to final_learning_rate, 0 when None) or "step" (x decay_factor
  # at each of decay_epochs); None: "cosine" with final_learning_rate set, else "constant".
  schedule: str | None = None
  decay_epochs: tuple[float, ...] = ()
  decay_factor: float = 0.1
  # Linear warm-up over this many epochs: step t < W runs at learning_rate * (t + 1) / W.
  warmup_epochs: float = 0.0
  # The epochs of the optimizer's steps (its section's `epochs`): the unit of
  # decay_epochs and warmup_epochs, one epoch = its steps / epochs.
  epochs: float = 1.0

  @property
  def schedule_kind(self) -> str:
    if self.schedule is not None:
      return self.schedule
    return "constant" if self.final_learning_rate is None else "cosine"

  def hyperparams(self) -> dict[str, np.float32]:
    """Every injected value but the learning rate (which comes per step)."""
    values = dict(momentum=self.momentum, weight_decay=self.weight_decay)
    if self.kind != "sgd":
      values.update(beta2=self.beta2, eps=self.eps)
    return {k: np.float32(v) for k, v in values.items()}

  def learning_rates(self, steps, total_steps: int) -> np.ndarray:
    """The learning rate of each of `steps` (0-based) of the optimizer's `total_steps`.

    Step decay as torch.optim.lr_scheduler.MultiStepLR stepped once per epoch, cosine
    as optax.cosine_decay_schedule over the steps after the warm-up.
    """
    t = np.asarray(steps, np.float64)
    lr, total = float(self.learning_rate), max(int(total_steps), 1)
    per_epoch = total / max(float(self.epochs), 1e-12)
    warm = int(round(self.warmup_epochs * per_epoch))
    kind = self.schedule_kind
    if kind == "cosine":
      final = self.final_learning_rate or 0.0
      span = max(total - warm, 1)
      frac = np.clip(t - warm, 0, span) / span
      rates = final + (lr - final) * 0.5 * (1 + np.cos(np.pi * frac))
    elif kind == "step":
      drops = sum((t >= round(e * per_epoch)).astype(np.float64) for e in self.decay_epochs)
      rates = lr * self.decay_factor ** np.asarray(drops)
    else:
      rates = np.full_like(t, lr)
    if warm:
      rates = np.where(t < warm, lr * (t + 1) / warm, rates)
    return np.asarray(rates, np.float32)


def from_section(s, name: str = "sgd", **override) -> Optimizer:
  """The optimizer a method's config section describes (`override` replaces any field)."""
  decay = tuple(float(e) for e in str(s.decay_epochs).split(",") if e.strip())
  kw = dict(kind=s.optimizer, learning_rate=s.learning_rate, momentum=s.momentum,
            weight_decay=s.weight_decay, beta2=s.beta2, eps=s.eps, schedule=s.schedule,
            final_learning_rate=s.final_learning_rate, decay_epochs=decay,
            decay_factor=s.decay_factor, warmup_epochs=s.warmup_epochs, epochs=s.epochs)
  return Optimizer(**{**kw, **override}, name=name)


def section_fields(learning_rate: float, epochs: int, momentum: float = 0.9,
                   weight_decay: float = 0.0) -> Mapping[str, object]:
  """The optimizer fields of every training section, with their defaults."""
  return dict(
      epochs=epochs,  # passes over the driving stream's pool
      learning_rate=learning_rate,  # peak (after any warm-up)
      momentum=momentum,  # SGD's momentum; Adam's beta1
      weight_decay=weight_decay,  # sgd, adam: added to the gradient; adamw: decoupled
      optimizer="sgd",  # "sgd", "adam" or "adamw" (PyTorch's semantics)
      beta2=0.999,  # adam, adamw
      eps=1e-8,  # adam, adamw
      schedule="constant",  # "constant", "cosine" or "step"
      final_learning_rate=0.0,  # cosine: the rate it decays to
      decay_epochs="",  # step: epochs at which the rate is multiplied ("91,136")
      decay_factor=0.1,  # step: the factor
      warmup_epochs=0.0,  # linear warm-up from lr / W to lr over this many epochs
      batch_size=0,  # examples per step of each stream; 0: config.batch_size
  )
