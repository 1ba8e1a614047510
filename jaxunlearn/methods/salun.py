"""SalUn: Random Labels restricted to the weights most salient for the forget set.

Reference: Fan et al., "SalUn: Empowering Machine Unlearning via Gradient-based
Weight Saliency" (ICLR 2024), OPTML-Group/Unlearn-Saliency
`Classification/generate_mask.py` + `unlearn/RL.py`. The mask: the gradient of
-CE (the Original, mean over each forget batch) summed over the forget batches,
its absolute value ranked globally over all parameters; the top `mask_fraction`
(floor(N * fraction) entries) are trainable. Then RL (`random_labels.py`) with
masked updates. Since the reference's fix of 2026-02 (PR #33, issue #32), weights
outside the mask are restored after every step and their momentum zeroed, because
weight decay still moved them: here gradient and update are both masked, so
nothing outside the mask changes, momentum included. Defaults: mask fraction 0.5,
RL's lr 0.013, 10 epochs, weight decay 5e-4.

Modes: the mask sweep in eval mode (`generate_mask.py` calls `model.eval()`), the
RL passes in train mode.
Augmentation (with `data.augment`): the RL passes yes; the mask sweep never (the
reference's mask loader reads augmented images; a sweep here is deterministic).
"""
import jax
import jax.numpy as jnp

from jaxunlearn import fields, losses, search, train
from jaxunlearn.methods import base, random_labels

DISPLAY_NAME = "SalUn"
# What a tuning run searches (`search.py`); the reference's grids.
SEARCH_SPACE = search.training(mask_fraction=search.Range(0.1, 0.9))


def get_config():
  c = random_labels.get_config()
  c.mask_fraction = 0.5  # share of all parameters that may change (the most salient)
  return c


def _forget_gradient(ctx, params, batch):
  b = batch["data"]
  def neg_ce(p):
    return -losses.cross_entropy(ctx.apply(p, b["image"], mask=b["mask"])[0],
                                 b["label"], b["mask"])
  return {}, jax.grad(neg_ce)(params)


def saliency_mask(grads, fraction: float):
  """1.0 on the int(N * fraction) entries of largest |grad| over all parameters, else 0.0."""
  n = sum(g.size for g in jax.tree.leaves(grads))
  return _top_k_mask(grads, jnp.int32(int(n * fraction)))  # k as the reference rounds it


@jax.jit
def _top_k_mask(grads, k):
  leaves, treedef = jax.tree.flatten(grads)
  flat = jnp.concatenate([jnp.abs(g).ravel() for g in leaves])
  rank = jnp.zeros(flat.size, jnp.int32).at[jnp.argsort(-flat, stable=True)].set(
      jnp.arange(flat.size, dtype=jnp.int32))
  keep = (rank < k).astype(jnp.float32)
  parts, start = [], 0
  for g in leaves:
    parts.append(keep[start:start + g.size].reshape(g.shape))
    start += g.size
  return jax.tree.unflatten(treedef, parts)


def recipe(s):
  def prepare(trainer, variables):
    _, grads = trainer.sweep(_forget_gradient, variables, "forget")
    return train.Inputs(update_mask=saliency_mask(grads, s.mask_fraction))
  return train.Recipe(random_labels.phases(s), prepare=prepare)


def validate(c, name):
  base.validate_optimizer(c, name)
  fields.check_float(c, f"{name}.mask_fraction", 0, 1, open_low=True, open_high=False)
