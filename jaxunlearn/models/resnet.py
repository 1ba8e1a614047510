"""The CIFAR ResNet of the machine-unlearning references, with PyTorch's BatchNorm.

Reference: OPTML-Group/Unlearn-Sparse `models/ResNet.py`, `resnet18(imagenet=False)`
(also resnet34 / resnet50), itself torchvision's ResNet (v1.5) with a CIFAR stem:
a 3x3 stride-1 convolution instead of the 7x7 stride-2 one, and no max-pool.

  stem:    conv3x3 (stride 1, no bias) - BN - ReLU
  stages:  widths width x (1, 2, 4, 8) (x4 out for Bottleneck); the first stage
           keeps the resolution, each later one halves it in its first block (on
           the 3x3 conv, for Bottleneck as well: torchvision v1.5)
  shortcut: conv1x1 (stride) - BN where the shape changes, the identity otherwise
  head:    global average pool -> features (B, D) -> Linear -> logits

Layout is NHWC (PyTorch: NCHW); a conv kernel is HWIO (PyTorch: OIHW). Parameter
names follow torchvision's: stem_conv/stem_bn = conv1/bn1, stage{i}_block{j} =
layer{i}.{j}, shortcut_conv/shortcut_bn = downsample.0/.1, head = fc.

The reference normalises the input INSIDE the model (`NormalizeByChannelMeanStd`
with the CIFAR-10 mean and std); here that normalisation belongs to the data
pipeline, so the model sees already-normalised pixels. Otherwise nothing differs
from PyTorch: the BatchNorm is PyTorch's (momentum 0.1, eps 1e-5, unbiased running
variance; see batchnorm.py), padding is explicit and symmetric like PyTorch's, and
the initialisation is torchvision's (tests compare forward, gradients and running
statistics with a PyTorch model).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxunlearn.models.batchnorm import BatchNorm

# Registered depths, named as in torchvision / the references.
VARIANTS: dict[str, dict[str, Any]] = {
    "resnet18": dict(stage_sizes=(2, 2, 2, 2), block="basic"),
    "resnet34": dict(stage_sizes=(3, 4, 6, 3), block="basic"),
    "resnet50": dict(stage_sizes=(3, 4, 6, 3), block="bottleneck"),
}

# torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu"), an untruncated
# normal with variance 2 / (out channels x kernel area).
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _torch_linear_bias_init(fan_in: int):
  """PyTorch's nn.Linear bias: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = fan_in ** -0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


# PyTorch's nn.Linear weight: kaiming_uniform_(a=sqrt(5)) = uniform(+-1/sqrt(fan_in)).
_head_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _conv(features: int, kernel: int, strides: int, dtype, name: str) -> nn.Conv:
  # Explicit symmetric padding: "SAME" pads a stride-2 3x3 conv (0, 1), PyTorch (1, 1).
  pad = (kernel - 1) // 2
  return nn.Conv(features, (kernel, kernel), (strides, strides), padding=((pad, pad), (pad, pad)),
                 use_bias=False, kernel_init=_conv_init, dtype=dtype, name=name)


class BasicBlock(nn.Module):
  """relu(bn2(conv3x3(relu(bn1(conv3x3_s(x))))) + shortcut(x)); out width = features."""
  features: int
  strides: int = 1
  dtype: Any = jnp.float32
  expansion = 1

  @nn.compact
  def __call__(self, x_BxHxWxC, train: bool, mask=None):
    y = _conv(self.features, 3, self.strides, self.dtype, "conv1")(x_BxHxWxC)
    y = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(y, train, mask))
    y = _conv(self.features, 3, 1, self.dtype, "conv2")(y)
    y = BatchNorm(dtype=self.dtype, name="bn2")(y, train, mask)
    return nn.relu(y + _shortcut(self, x_BxHxWxC, self.features, train, mask))


class Bottleneck(nn.Module):
  """conv1x1 - conv3x3 (stride) - conv1x1 (x4 width) + shortcut; out width = 4 x features."""
  features: int
  strides: int = 1
  dtype: Any = jnp.float32
  expansion = 4

  @nn.compact
  def __call__(self, x_BxHxWxC, train: bool, mask=None):
    y = _conv(self.features, 1, 1, self.dtype, "conv1")(x_BxHxWxC)
    y = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(y, train, mask))
    y = _conv(self.features, 3, self.strides, self.dtype, "conv2")(y)
    y = nn.relu(BatchNorm(dtype=self.dtype, name="bn2")(y, train, mask))
    out = self.features * self.expansion
    y = _conv(out, 1, 1, self.dtype, "conv3")(y)
    y = BatchNorm(dtype=self.dtype, name="bn3")(y, train, mask)
    return nn.relu(y + _shortcut(self, x_BxHxWxC, out, train, mask))


def _shortcut(block: nn.Module, x_BxHxWxC, out: int, train: bool, mask):
  """The identity, or conv1x1 (stride) + BN where the block changes the shape.

  Called inside the block's compact `__call__`, so its layers are the block's.
  """
  if block.strides == 1 and x_BxHxWxC.shape[-1] == out:
    return x_BxHxWxC
  y = _conv(out, 1, block.strides, block.dtype, "shortcut_conv")(x_BxHxWxC)
  return BatchNorm(dtype=block.dtype, name="shortcut_bn")(y, train, mask)


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(nn.Module):
  """CIFAR ResNet: images (B, H, W, C) -> (logits_BxC, features_BxD), both float32.

  `train` selects batch statistics (and, with "batch_stats" mutable, their update)
  or the running ones; `mask` (B,) of 0/1 marks the real rows of a padded batch
  for every BatchNorm. D = 8 x width x expansion (512 for ResNet-18, 2048 for -50).
  """
  num_classes: int
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  block: str = "basic"
  width: int = 64
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC, train: bool, mask=None):
    if self.block not in BLOCKS:
      raise ValueError(f"block must be one of {sorted(BLOCKS)}, got {self.block!r}")
    block_cls = BLOCKS[self.block]
    x = _conv(self.width, 3, 1, self.dtype, "stem_conv")(x_BxHxWxC.astype(self.dtype))
    x = nn.relu(BatchNorm(dtype=self.dtype, name="stem_bn")(x, train, mask))
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = block_cls(self.width * 2 ** i, strides, self.dtype,
                      name=f"stage{i + 1}_block{j}")(x, train, mask)
    features_BxD = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    # The head stays float32 under bf16 compute: it is tiny, and the logits feed
    # every loss and metric.
    D = features_BxD.shape[-1]
    logits_BxC = nn.Dense(self.num_classes, kernel_init=_head_kernel_init,
                          bias_init=_torch_linear_bias_init(D), name="head")(features_BxD)
    return logits_BxC.astype(jnp.float32), features_BxD


# ---- the registry entry (`models/__init__.py`): resnet18, resnet34, resnet50 ----

SECTION = "resnet"


def get_config():
  """`config.model.resnet`: sizes of every ResNet name (the depth comes from the name)."""
  import ml_collections
  return ml_collections.ConfigDict(dict(
      # Channels of the first stage (64 in the references); later stages double it.
      # Smaller for tests and the CPU (e.g. 8).
      width=64,
      # Blocks per stage, comma-separated ("1,1,1,1"); "" takes the name's
      # (resnet18: 2,2,2,2; resnet34 and resnet50: 3,4,6,3).
      stage_sizes="",
  ))


def _stage_sizes(c, name: str) -> tuple[int, ...]:
  text = c.model.resnet.stage_sizes
  return tuple(int(v) for v in text.split(",")) if text.strip() else VARIANTS[name]["stage_sizes"]


def validate(c, name: str | None, num_classes: int) -> None:
  """Checks `config.model.resnet` (`name`: the chosen ResNet, or None)."""
  from jaxunlearn import fields
  del name, num_classes
  fields.check_int(c, "model.resnet.width", 1, 1 << 16)
  fields.check_str(c, "model.resnet.stage_sizes", 'comma-separated block counts ("2,2,2,2") or ""')
  try:
    sizes = [int(v) for v in c.model.resnet.stage_sizes.split(",")] \
        if c.model.resnet.stage_sizes.strip() else [1]
  except ValueError:
    sizes = []
  if not sizes or any(not 1 <= s <= 1000 for s in sizes):
    fields.fail("model.resnet.stage_sizes", "must be block counts in 1..1000, comma-separated, "
                f"e.g. \"2,2,2,2\" (\"\": the name's); got {c.model.resnet.stage_sizes!r}")


def build(config, name: str, num_classes: int, image_shape, rng, dtype):
  """(Model, variables) of a randomly initialised ResNet; it takes images at their stored size."""
  from jaxunlearn.models import base
  net = ResNet(num_classes=num_classes, stage_sizes=_stage_sizes(config, name),
               block=VARIANTS[name]["block"], width=config.model.resnet.width, dtype=dtype)
  model = base.Model(net, image_size=None, stateful=True)
  return model, model.init(rng, (1, *image_shape))
