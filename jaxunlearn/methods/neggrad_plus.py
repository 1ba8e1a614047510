"""NegGrad+: descend on the retain set and ascend on the forget set in the same step.

Reference: Kurmanji et al., "Towards Unbounded Machine Unlearning" (NeurIPS 2023);
xcadet/deepunlearn `munl/unlearning/neggradplus.py`, kairanzhao/RUM
`unlearn/neggrad.py`: loss = alpha * CE(retain batch) - (1 - alpha) * CE(forget
batch); the retain set drives the epoch, forget batches cycle. deepunlearn's
defaults: alpha 0.95, SGD lr 0.01, momentum 0.9, weight decay 0, 10 epochs.

Modes: train mode for both passes, retain batch first, then forget batch, as RUM's
`neggrad.py` (`model.train()`); deepunlearn's `neggradplus.py` runs them in eval mode.
We follow RUM, the training-loop convention of every other reference here.
Augmentation (with `data.augment`): yes (the training transform of its loaders).
"""
from jaxunlearn import fields, losses, search, train
from jaxunlearn.methods import base

DISPLAY_NAME = "NegGrad+"
# What a tuning run searches (`search.py`); the reference's grids.
SEARCH_SPACE = search.training(alpha=search.Range(0.5, 1.0))


def get_config():
  return base.section(learning_rate=0.01, epochs=10, alpha=0.95)


def retain_minus_forget(ctx, params, batch):
  f, r = batch["forget"], batch["retain"]
  ce_r = losses.cross_entropy(ctx.apply(params, r["image"], mask=r["mask"])[0], r["label"],
                              r["mask"])
  ce_f = losses.cross_entropy(ctx.apply(params, f["image"], mask=f["mask"])[0], f["label"],
                              f["mask"])
  a = ctx.hp["alpha"]
  return a * ce_r - (1 - a) * ce_f, {"retain_ce": ce_r, "forget_ce": ce_f}


def recipe(s):
  return train.Recipe([train.Phase(
      "neggrad_plus", retain_minus_forget,
      {"retain": train.Stream("retain", epochs=s.epochs), "forget": train.Stream("forget")},
      base.optimizer(s), hparams={"alpha": s.alpha})])


def validate(c, name):
  base.validate_optimizer(c, name)
  fields.check_float(c, f"{name}.alpha", 0, 1, open_high=False)
