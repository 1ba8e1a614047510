"""The study's two-stage method (see ../shared/study.md; its origin is FCS, `fcs.py`).

Stage 1: `stage1_steps` steps (one) of KL(uniform || p) on forget batches.
Stage 2 (the same optimizer state): per forget batch, the next batch of a retain
stream that cycles across epochs; both cut to their common size m; loss =
contrastive(z_f, stop_grad(z_r); temperature) + cross-entropy(z_r), summed in
one step.

How it differs from FCS as the competition code does it (`fcs.py`): FCS runs a
whole pass of stage 1, has three SGD optimizers (stage 1, forget, retain), and in
stage 2 alternates a forget round of the contrastive term alone (cosine-decayed lr)
with a separate retain pass of cross-entropy; it never cuts batches to a common size.
Defaults are the study's: SGD lr 1e-4, momentum 0.9, 5 epochs, temperature 1.15.

Modes: train mode; z_f and z_r are two forward passes (forget, then retain), as
the study writes them and as FCS runs them; the study does not state the mode.
Augmentation (with `data.augment`): yes, as the Original's training.
"""
import jax.numpy as jnp

from jaxunlearn import fields, losses, objectives, search, train
from jaxunlearn.methods import base

DISPLAY_NAME = "2-Stage"
# What a tuning run searches (`search.py`); the reference's grids.
SEARCH_SPACE = search.training()


def get_config():
  return base.section(learning_rate=1e-4, epochs=5, temperature=1.15, stage1_steps=1)


def contrastive_retain(ctx, params, batch):
  f, r = batch["forget"], batch["retain"]
  # Cut both to m = min(real forget, real retain). Real examples come first in a
  # batch row, so the cut is a prefix mask.
  m = jnp.minimum(jnp.sum(f["mask"]), jnp.sum(r["mask"]))
  cut = lambda b: (jnp.arange(b["mask"].shape[0]) < m).astype(jnp.float32)
  # Two train-mode passes, forget then retain, as the study's z_f = f(B_f), z_r = f(B_r):
  # with BatchNorm one pass over the concatenated batch would differ.
  z_f, _ = ctx.apply(params, f["image"], mask=f["mask"])
  z_r, _ = ctx.apply(params, r["image"], mask=r["mask"])
  con = losses.contrastive(z_f, z_r, cut(f), cut(r), ctx.hp["temperature"])
  ret = losses.cross_entropy(z_r, r["label"], cut(r))
  return con + ret, {"contrastive": con, "retain_ce": ret}


def recipe(s):
  opt = base.optimizer(s)
  return train.Recipe([
      train.Phase("stage1", objectives.kl_uniform,
                  {"data": train.Stream("forget", epochs=1, max_steps=s.stage1_steps)}, opt),
      train.Phase("stage2", contrastive_retain,
                  {"forget": train.Stream("forget", epochs=s.epochs),
                   "retain": train.Stream("retain")}, opt,
                  hparams={"temperature": s.temperature}),
  ])


def validate(c, name):
  base.validate_optimizer(c, name)
  fields.check_float(c, f"{name}.temperature", 0, open_low=True)
  fields.check_int(c, f"{name}.stage1_steps", 0)
