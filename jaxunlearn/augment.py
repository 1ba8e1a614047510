"""Training-time augmentation on the devices, inside the compiled step.

`crop_flip` is the references' CIFAR training transform (Unlearn-Sparse
`dataset.py`: `RandomCrop(32, padding=4)` then `RandomHorizontalFlip()`): pad
each image with `pad` zero pixels per side (black, before normalisation, as
torchvision pads the PIL image), cut a window of the original size at a random
offset, and mirror it left-right with probability 1/2. Offsets and flips are
drawn from the step's key, so a run is deterministic and a resumed run draws the
same ones (bitwise). Evaluation, sweeps and every metric never augment.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

KINDS = ("none", "crop_flip")
PAD = 4  # pixels of zero padding per side before the random crop


def crop_flip(pixels_BxHxWxC, offsets_Bx2, flips_B, pad: int = PAD):
  """The crops at the given (row, column) offsets in [0, 2 pad], then the flips (bool)."""
  B, H, W, C = pixels_BxHxWxC.shape
  padded = jnp.pad(pixels_BxHxWxC, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

  def one(image, offset, flip):
    window = jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (H, W, C))
    return jnp.where(flip, window[:, ::-1], window)

  return jax.vmap(one)(padded, offsets_Bx2, flips_B)


def random_crop_flip(key, pixels_BxHxWxC, pad: int = PAD):
  """`crop_flip` with offsets uniform in [0, 2 pad] and flips with probability 1/2."""
  k_offset, k_flip = jax.random.split(key)
  B = pixels_BxHxWxC.shape[0]
  offsets = jax.random.randint(k_offset, (B, 2), 0, 2 * pad + 1)
  flips = jax.random.bernoulli(k_flip, 0.5, (B,))
  return crop_flip(pixels_BxHxWxC, offsets, flips, pad)


def apply(kind: str, key, pixels_BxHxWxC):
  """The run's augmentation `kind` ("none" leaves the pixels as they are)."""
  if kind == "none":
    return pixels_BxHxWxC
  if kind == "crop_flip":
    return random_crop_flip(key, pixels_BxHxWxC)
  raise ValueError(f"unknown augmentation {kind!r}; allowed: {', '.join(KINDS)}")
