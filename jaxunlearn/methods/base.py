"""What the method modules share: their config sections, optimizers, the common prepare sweeps.

A method module states only what is particular to it:
  DISPLAY_NAME            the name in tables and figures;
  get_config()            its config section, defaults from its reference code;
  recipe(s) -> Recipe     its phases (and prepare / edit), from its section `s` only;
  validate(c, name)       optional: checks beyond `validate_optimizer`.
A section read by several stages names itself in SECTION (Original and Gold read "train").

Train or eval mode: in a phase's step, `ctx.apply` runs the model in train mode
(BatchNorm on batch statistics, its running statistics updated in call order),
as each reference's `model.train()` loop does; sweeps (`prepare`) and edits run
it in eval mode. A method whose reference differs passes `train=` itself and
says so in its docstring.
"""
from __future__ import annotations

import ml_collections

from jaxunlearn import fields, optimizers, train


def section(learning_rate: float, epochs: int, *, momentum: float = 0.9,
            weight_decay: float = 0.0, **extra) -> ml_collections.ConfigDict:
  """A method's config section: the optimizer fields every training method has, then its own."""
  fields_ = dict(optimizers.section_fields(learning_rate, epochs, momentum, weight_decay))
  overrides = {k: extra.pop(k) for k in list(extra) if k in fields_}
  return ml_collections.ConfigDict({**fields_, **overrides, **extra})


def optimizer(s, name: str = "sgd", **override) -> train.Optimizer:
  """The section's optimizer (`override` replaces any of its fields)."""
  return optimizers.from_section(s, name, **override)


def validate_optimizer(c, name: str) -> None:
  fields.check_optimizer(c, name)


def logits_table(pool: str):
  """A prepare step: the starting model's logits for every example of `pool`, in eval mode.

  The frozen Original of SCRUB and DELETE runs in eval mode in the references
  (`model_t.eval()`): deterministic, so one compiled pass replaces a teacher
  forward in every step; each batch then carries its rows as
  batch[stream]["teacher_logits"].
  """
  def prepare(trainer, variables):
    tables, _ = trainer.sweep(_logits, variables, pool)
    return train.Inputs(tables=tables)
  return prepare


def _logits(ctx, params, batch):
  b = batch["data"]
  logits_BxC, _ = ctx.apply(params, b["image"], mask=b["mask"])
  return {"teacher_logits": logits_BxC}, ()
