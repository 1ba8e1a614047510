"""SSD-Det: SSD with importances that do not depend on how the examples are batched.

Reference: pedroandreou/supreme-unlearning `src/supreme/methods/unlearning_methods/
ssd_det.py`; Lanyon et al., arXiv 2510.26714, appendix B. SSD (`ssd.py`) squares each
batch's mean gradient, so its importances change with batch size and order; here each
importance is the mean over examples of the squared per-example CE gradient,
I = (1 / N) sum_i g_i^2, the diagonal Fisher as the SSD paper writes it. Selection and
dampening as SSD (`ssd.dampen`): where I_f > alpha * I_D, theta <- theta * min(1,
lambda * I_D / I_f); the same defaults.

Per-example gradients: `jax.vmap` of the gradient over a sweep batch (each example
through the model alone, in eval mode, so BatchNorm's running statistics make every
example independent of the others); padding rows have gradient 0 and are not
counted. `batch_size` changes only the memory (it holds that many gradients at once).

Modes: both sweeps in eval mode (the reference calls `model.eval()` first), as SSD.
Augmentation: none (sweeps never augment).
"""
import jax
import jax.numpy as jnp

from jaxunlearn import losses
from jaxunlearn.methods import ssd

DISPLAY_NAME = "SSD-Det"
SEARCH_SPACE = ssd.SEARCH_SPACE  # alpha and lambda, as SSD's


def get_config():
  import ml_collections
  return ml_collections.ConfigDict(dict(
      alpha=5.0,  # selection: weights with I_f > alpha * I_D are dampened
      dampening=1.0,  # lambda: the factor is min(1, lambda * I_D / I_f)
      # examples per sweep batch (0: config.batch_size); the importances do not depend
      # on it, the memory does (this many per-example gradients at once)
      batch_size=64,
  ))


def _squared_example_gradients(ctx, params, batch):
  b = batch["data"]
  def ce(p, image, label, mask):
    logits_1xC, _ = ctx.apply(p, image[None], mask=mask[None])
    return losses.cross_entropy(logits_1xC, label[None], mask[None])
  grads = jax.vmap(jax.grad(ce), in_axes=(None, 0, 0, 0))(params, b["image"], b["label"],
                                                          b["mask"])
  return {}, (jax.tree.map(lambda g_B: jnp.sum(jnp.square(g_B), 0), grads), jnp.sum(b["mask"]))


def importance(trainer, variables, pool, batch_size=None):
  """Mean over the pool's examples of the squared per-example CE gradient."""
  _, (sq, n) = trainer.sweep(_squared_example_gradients, variables, pool, batch_size=batch_size)
  return jax.tree.map(lambda x: x / n, sq)


def recipe(s):
  return ssd.dampening_recipe(s, importance)


validate = ssd.validate
