"""Boundary Shrinking: relabel each forget example as its nearest wrong class, then fine-tune on it.

Reference: Chen et al., "Boundary Unlearning" (CVPR 2023); Unlearn-Saliency
`Classification/unlearn/boundary_sh.py`. On a frozen copy of the Original, FGSM
in [0, 1] pixel space: x' = clip(x + bound * sign(grad_x CE(x, y)), 0, 1), rounded
to multiples of 1/255; the neighbour label is the frozen model's argmax on x'.
Then minimise CE(model(x), neighbour label) over forget batches; SGD momentum
0.9, weight decay 5e-4, the repository's lr 0.01 (searched in the paper), 10 epochs.
The frozen model never changes and FGSM is deterministic, so the labels are
computed once, in one compiled pass (the same labels the reference recomputes
each epoch). Pixels are perturbed at their stored resolution, before the resize.

Modes: FGSM and the neighbour labels on the frozen copy in eval mode (a sweep;
`test_model.eval()` in the reference), the training passes in train mode.
Augmentation (with `data.augment`): the training passes yes; the FGSM labels are computed
once on unaugmented images (the reference's loader is augmented).
"""
import jax
import jax.numpy as jnp

from jaxunlearn import fields, losses, search, train
from jaxunlearn.methods import base

DISPLAY_NAME = "Boundary Shrinking"
# What a tuning run searches (`search.py`); the reference's grids.
SEARCH_SPACE = search.training(bound=search.Range(0.01, 1.0, log=True))


def get_config():
  return base.section(learning_rate=0.01, epochs=10, weight_decay=5e-4, bound=0.1)


def neighbour_labels(ctx, params, batch):
  """FGSM on the (frozen) starting model: the label it gives the perturbed image."""
  b = batch["data"]
  def ce(x):
    return losses.cross_entropy(ctx.apply(params, x, mask=b["mask"])[0], b["label"], b["mask"])
  x_adv = jnp.clip(b["image"] + ctx.hp["bound"] * jnp.sign(jax.grad(ce)(b["image"])), 0, 1)
  x_adv = jnp.round(x_adv * 255) / 255
  logits_BxC, _ = ctx.apply(params, x_adv, mask=b["mask"])
  return {"neighbour": jnp.argmax(logits_BxC, axis=-1).astype(jnp.int32)}, ()


def shrink(ctx, params, batch):
  b = batch["data"]
  logits_BxC, _ = ctx.apply(params, b["image"], mask=b["mask"])
  return losses.cross_entropy(logits_BxC, b["neighbour"], b["mask"]), {}


def recipe(s):
  def prepare(trainer, variables):
    tables, _ = trainer.sweep(neighbour_labels, variables, "forget", hparams={"bound": s.bound})
    return train.Inputs(tables=tables)
  return train.Recipe([train.Phase("shrink", shrink, {"data": train.Stream("forget", epochs=s.epochs)},
                                   base.optimizer(s))], prepare=prepare)


def validate(c, name):
  base.validate_optimizer(c, name)
  fields.check_float(c, f"{name}.bound", 0, 1, open_low=True, open_high=False)
