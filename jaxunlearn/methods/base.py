"""What the method modules share: their config sections, SGD, the common prepare sweeps.

A method module states only what is particular to it:
  DISPLAY_NAME            the name in tables and figures;
  get_config()            its config section, defaults from its reference code;
  recipe(s) -> Recipe     its phases (and prepare / edit), from its section `s` only;
  validate(c, name)       optional: checks beyond `validate_sgd`.
A section read by several stages names itself in SECTION (Original and Gold read "train").
"""
from __future__ import annotations

import ml_collections

from jaxunlearn import config as config_lib, train


def section(learning_rate: float, epochs: int, *, momentum: float = 0.9,
            weight_decay: float = 0.0, **extra) -> ml_collections.ConfigDict:
  """A method's config section: the SGD fields every training method has, then its own."""
  return ml_collections.ConfigDict(dict(epochs=epochs, learning_rate=learning_rate,
                                        momentum=momentum, weight_decay=weight_decay, **extra))


def sgd(s, name: str = "sgd", **override) -> train.Optimizer:
  """The section's SGD (`override` replaces any of its fields)."""
  kw = dict(learning_rate=s.learning_rate, momentum=s.momentum, weight_decay=s.weight_decay)
  return train.Optimizer(**{**kw, **override}, name=name)


def validate_sgd(c, name: str) -> None:
  config_lib.check_optimizer(c, name)


def logits_table(pool: str):
  """A prepare step: the starting model's logits for every example of `pool`.

  The frozen Original of SCRUB and DELETE is deterministic (no dropout or
  BatchNorm), so one compiled pass replaces a teacher forward in every step; each
  batch then carries its rows as batch[stream]["teacher_logits"].
  """
  def prepare(trainer, params):
    tables, _ = trainer.sweep(_logits, params, pool)
    return train.Inputs(tables=tables)
  return prepare


def _logits(ctx, params, batch):
  logits_BxC, _ = ctx.apply(params, batch["data"]["image"])
  return {"teacher_logits": logits_BxC}, ()
