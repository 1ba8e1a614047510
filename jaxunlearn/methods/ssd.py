"""SSD (Selective Synaptic Dampening): shrink the weights far more important to the forget set.

Reference: Foster et al., "Fast Machine Unlearning Without Retraining Through
Selective Synaptic Dampening" (AAAI 2024), if-loops/selective-synaptic-dampening
`src/ssd.py`. No training. Importances are diagonal Fisher estimates: the square of
each batch's mean-CE gradient, averaged over batches, on the forget set (I_f) and
on the full training set (I_D). Where I_f > alpha * I_D, theta <- theta *
min(1, lambda * I_D / I_f). Defaults: lambda 1, alpha 5 (the reference's ViT
full-class setting; 10 for ResNet). Batches of `batch_size` (0: config.batch_size;
the reference: 64), unshuffled.

Order: a square of batch means depends on which examples share a batch, so the
sweeps read the reference's loaders' order. I_f: the forget set in data-set order.
I_D: the pool "retain_then_forget" (`scenario.py`): the retain examples class by
class (fine class in the sub-class scenario; data-set order within a class, and
throughout in the random scenario), then the forget set, as the reference's
`full_train_dl` over ConcatDataset(retain, forget) (`forget_full_class_main.py`,
`forget_full_class_strategies.build_retain_forget_sets`). `ssd_det.py` has an
importance that depends on no order or batching.

Modes: both importance sweeps in eval mode (`forget_full_class_strategies.py` calls
`model.eval()` first), so BatchNorm's running statistics are not changed before the
dampening; BatchNorm's scale and bias have importances and can be dampened, as there.
Augmentation: none (sweeps never augment; the reference's `transform_unlearning` has none).
"""
import jax
import jax.numpy as jnp

from jaxunlearn import fields, losses, search, train

DISPLAY_NAME = "SSD"
# What a tuning run searches (`search.py`): the reference's alpha and lambda grids.
SEARCH_SPACE = {"alpha": search.Range(0.1, 100.0, log=True),
                "dampening": search.Range(0.1, 10.0, log=True)}
# The full-data importance's pool: the reference's order (see above).
FULL_POOL = "retain_then_forget"


def get_config():
  import ml_collections
  return ml_collections.ConfigDict(dict(
      alpha=5.0,  # selection: weights with I_f > alpha * I_D are dampened
      dampening=1.0,  # lambda: the factor is min(1, lambda * I_D / I_f)
      batch_size=0,  # examples per importance batch (0: config.batch_size; reference 64)
  ))


def _squared_gradient(ctx, params, batch):
  b = batch["data"]
  def ce(p):
    return losses.cross_entropy(ctx.apply(p, b["image"], mask=b["mask"])[0],
                                b["label"], b["mask"])
  return {}, (jax.tree.map(jnp.square, jax.grad(ce)(params)), jnp.float32(1))


def importance(trainer, variables, pool, batch_size=None):
  """Mean over the pool's batches of the squared batch gradient (SSD's calc_importance)."""
  _, (sq, batches) = trainer.sweep(_squared_gradient, variables, pool, batch_size=batch_size)
  return jax.tree.map(lambda x: x / batches, sq)


def dampen(ctx, params):
  i_f, i_d = ctx.frozen["forget"], ctx.frozen["full"]
  def one(theta, f, d):
    selected = f > ctx.hp["alpha"] * d
    factor = jnp.minimum(1.0, ctx.hp["dampening"] * d / jnp.where(selected, f, 1.0))
    return jnp.where(selected, theta * factor, theta)
  return jax.tree.map(one, params, i_f, i_d)


def dampening_recipe(s, importance_fn):
  """I_f and I_D by `importance_fn(trainer, variables, pool, batch_size)`, then `dampen`."""
  def prepare(trainer, variables):
    bs = s.batch_size or None
    return train.Inputs(frozen={"forget": importance_fn(trainer, variables, "forget", bs),
                                "full": importance_fn(trainer, variables, FULL_POOL, bs)})
  return train.Recipe([], prepare=prepare, edit=dampen,
                      edit_hparams={"alpha": s.alpha, "dampening": s.dampening})


def recipe(s):
  return dampening_recipe(s, importance)


def validate(c, name):
  fields.check_float(c, f"{name}.alpha", 0)
  fields.check_float(c, f"{name}.dampening", 0)
  fields.check_int(c, f"{name}.batch_size", 0)
