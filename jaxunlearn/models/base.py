"""The model interface: what the training loop, every method and every metric see of a model.

An architecture is a Flax Linen module whose `__call__` returns (logits, features).
A stateless one (the ViT) takes the input alone; a stateful one (the ResNet, with
BatchNorm) takes `(x, train, mask)` and keeps its state (running statistics) in
collections beside "params". `Model` gives both one call:

    apply(variables, x, train=..., mask=...) -> (logits, features, new model state)

where variables = {"params": ..., **model state} (the state is {} for the ViT),
x is the model's input (resized and normalised pixels, `device_data`), train
selects train or eval mode (BatchNorm: batch statistics and an update of the
running ones, or the running ones) and mask (B,) marks the real rows of a padded
batch, so padding never enters a batch statistic. A user's own module works the
same way: wrap it in `Model(module, stateful=...)`.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
  module: nn.Module
  # Input side in pixels: images are resized to it (bilinear) before normalisation;
  # None keeps their stored size.
  image_size: int | None = None
  # Whether `module.__call__(x, train, mask)` and it keeps state beside "params".
  stateful: bool = False

  def init(self, rng: jax.Array, input_shape: tuple[int, ...]) -> dict:
    """Variables for inputs of `input_shape` (B, H, W, C), created by a jitted init."""
    x = jnp.zeros(input_shape, jnp.float32)
    kw = dict(train=False) if self.stateful else {}
    return dict(jax.jit(lambda r: self.module.init(r, x, **kw))(rng))

  def apply(self, variables: dict, x_BxHxWxC, *, train: bool, mask_B=None):
    """(logits_BxC, features_BxD, new model state); eval mode leaves the state as it is."""
    state = model_state(variables)
    if not self.stateful:
      logits, features = self.module.apply(variables, x_BxHxWxC)
      return logits, features, state
    if train and state:
      (logits, features), new = self.module.apply(variables, x_BxHxWxC, train=True, mask=mask_B,
                                                  mutable=list(state))
      return logits, features, dict(new)
    logits, features = self.module.apply(variables, x_BxHxWxC, train=train, mask=mask_B)
    return logits, features, state


def check_outputs(model: Model, variables, image_shape: tuple[int, int, int],
                  num_classes: int) -> None:
  """Refuses, in one ValueError line, a model (one's own) whose outputs the study cannot use.

  Its module must return (logits (B, num_classes), features (B, D)) for a batch of images
  of `image_shape` (H, W, C; resized to `model.image_size` when set). Shapes only
  (`jax.eval_shape`): nothing is computed. A batch of 2, since a bare (2, C) logits array
  would otherwise unpack into two rows and pass as a pair.
  """
  H, W, C = image_shape
  side = model.image_size
  x = jax.ShapeDtypeStruct((2, side or H, side or W, C), jnp.float32)
  kw = dict(train=False, mask=None) if model.stateful else {}
  try:
    out = jax.eval_shape(lambda v, x: model.module.apply(v, x, **kw), variables, x)
  except Exception as e:  # the user's module, with the user's variables: any error is theirs
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise ValueError(f"model: applying it to images of shape {x.shape} failed "
                     f"({type(e).__name__}: {first}); check its input handling and variables"
                     ) from e
  shapes = jax.tree.map(lambda a: a.shape, out)
  if not (isinstance(out, (tuple, list)) and len(out) == 2
          and all(isinstance(a, jax.ShapeDtypeStruct) for a in out)):
    raise ValueError(f"model must return (logits, features), got {shapes}; return the "
                     "penultimate layer's output as features beside the logits")
  logits, features = out
  if logits.shape != (2, num_classes):
    raise ValueError(f"model's logits are {logits.shape} for a batch of 2, but the data set "
                     f"has {num_classes} classes; give its head {num_classes} outputs")
  if features.ndim != 2 or features.shape[0] != 2:
    raise ValueError(f"model's features are {features.shape} for a batch of 2; return them "
                     "as (batch, D), flattened")


def model_state(variables: dict) -> dict:
  """Everything but the parameters (BatchNorm's running statistics; {} for the ViT)."""
  return {k: v for k, v in variables.items() if k != "params"}


def num_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
