"""What the benchmark times: the models by name, their synthetic data and their FLOP counts.

A model spec is plain JSON (it also travels to the torch.compile subprocess):
  name, arch ("vit" or "resnet"), num_classes, and how images are stored
  (stored_size x stored_size x channels uint8, white = pixel_max), plus
  vit:    the ViT's keyword arguments (`models.vit.model_kwargs`), or
  resnet: stage_sizes, block, width.
Both sides build the same architecture from it: JAX through `models.build` and
the package's config, PyTorch in bench_torch.py.
"""
from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

from jaxunlearn import config as config_lib, datasets, models
from jaxunlearn.models import resnet, vit

_REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_CLASSES = 10
FORGET_CLASS = 0

MODELS = ("ti16", "digits", *resnet.VARIANTS)


def _digits_config():
  return config_lib.from_file(str(_REPO / "configs" / "digits.py"))


def config(name: str, *, depth: int = 0, resnet_width: int = 0, resnet_stages: str = "",
           dtype: str = "float32"):
  """The package config of a benchmark model (`config.model` is what is read).

  depth > 0 replaces a ViT's number of blocks (--quick: one block, a fast compile);
  resnet_width / resnet_stages ("1,1,1,1") shrink a ResNet for the CPU (0 / "": the name's).
  """
  if name == "ti16":
    c = config_lib.get_base_config()
    # CIFAR-10 as the study feeds it: 32x32 uint8, bilinear-resized to 224 in the step.
    c.model.vit.variant, c.model.vit.image_size = "Ti/16", 224
  elif name == "digits":
    c = _digits_config()
  elif name in resnet.VARIANTS:
    c = config_lib.get_base_config()
    c.model.name = name
    if resnet_width:
      c.model.resnet.width = resnet_width
    c.model.resnet.stage_sizes = resnet_stages
  else:
    raise ValueError(f"--model: unknown model {name!r}; allowed: {', '.join(MODELS)}")
  if depth and c.model.name == "vit":
    sizes = vit.model_kwargs(c.model.vit, NUM_CLASSES)
    c.model.vit.variant = ""
    for k in ("patch_size", "hidden_size", "num_heads", "mlp_dim"):
      c.model.vit[k] = sizes[k]
    c.model.vit.depth = depth
  c.model.dtype = dtype
  return c


def spec(name: str, **kw) -> dict[str, Any]:
  """The JSON spec of a benchmark model (keywords as `config`)."""
  c = config(name, **kw)
  if c.model.name == "vit":
    sizes = vit.model_kwargs(c.model.vit, NUM_CLASSES)
    stored = {"ti16": (32, 3, 255.0), "digits": (sizes["image_size"], 1, 16.0)}[name]
    arch = dict(arch="vit", vit=sizes)
  else:
    stages = c.model.resnet.stage_sizes
    arch = dict(arch="resnet", resnet=dict(
        stage_sizes=[int(s) for s in stages.split(",")] if stages.strip()
        else list(resnet.VARIANTS[name]["stage_sizes"]),
        block=resnet.VARIANTS[name]["block"], width=c.model.resnet.width))
    stored = (32, 3, 255.0)  # CIFAR-10 at its own size: the ResNet takes it unresized
  size, channels, pixel_max = stored
  return dict(name=name, num_classes=NUM_CLASSES, stored_size=size, channels=channels,
              pixel_max=pixel_max, **arch)


def build(name: str, rng, **kw):
  """(models.Model, variables) of a benchmark model, as the pipeline builds it."""
  s = spec(name, **kw)
  image_shape = (s["stored_size"], s["stored_size"], s["channels"])
  return models.build(config(name, **kw), NUM_CLASSES, image_shape, rng)


def describe_input(s: dict) -> str:
  size = s["vit"]["image_size"] if s["arch"] == "vit" else s["stored_size"]
  stored = f"uint8 {s['stored_size']}x{s['stored_size']}x{s['channels']}"
  if size != s["stored_size"]:
    return f"{stored}, bilinear-resized to {size} in the step"
  return f"{stored}, at model size"


def synthetic_data(s: dict, num_train: int, num_test: int, seed: int = 0) -> datasets.Dataset:
  r = np.random.default_rng(seed)
  shape = (s["stored_size"], s["stored_size"], s["channels"])
  images = lambda n: r.integers(0, int(s["pixel_max"]) + 1, (n, *shape)).astype(np.uint8)
  # Every class present, so the forget and retain pools are never empty.
  labels = lambda n: (np.arange(n) % NUM_CLASSES).astype(np.int32)
  return datasets.Dataset(images(num_train), labels(num_train), images(num_test), labels(num_test),
                          num_classes=NUM_CLASSES, pixel_max=s["pixel_max"],
                          class_names=tuple(map(str, range(NUM_CLASSES))))


# ---- model FLOPs: matmuls and convolutions of one image's forward pass (2 per multiply-add).
# Elementwise work (norms, activations, softmax, the resize) is left out. A train step
# is ~3x this (forward + backward w.r.t. activations and weights).

def vit_forward_flops(sizes: dict, channels: int) -> float:
  """Patch embedding, per block qkv + proj + MLP on every token and the two L x L
  attention products, and the head."""
  S, P, D, M = sizes["image_size"], sizes["patch_size"], sizes["hidden_size"], sizes["mlp_dim"]
  N = (S // P) ** 2
  L = N + 1  # patches + class token
  per_block = L * 2 * (4 * D * D + 2 * D * M) + 2 * 2 * L * L * D
  return 2 * N * P * P * channels * D + sizes["depth"] * per_block + 2 * D * sizes["num_classes"]


def resnet_forward_flops(sizes: dict, image_size: int, channels: int, num_classes: int) -> float:
  """Every convolution (stem, blocks, projection shortcuts) and the head."""
  def conv(h, k, c_in, c_out, stride=1):  # (flops, output side); padding (k - 1) // 2
    h_out = -(-h // stride)
    return 2 * h_out * h_out * k * k * c_in * c_out, h_out

  width, h = sizes["width"], image_size
  flops, h = conv(h, 3, channels, width)
  c_in = width
  for i, n in enumerate(sizes["stage_sizes"]):
    planes = width * 2 ** i
    for j in range(n):
      stride = 2 if i > 0 and j == 0 else 1
      if sizes["block"] == "basic":
        f1, h_out = conv(h, 3, c_in, planes, stride)
        f2, _ = conv(h_out, 3, planes, planes)
        flops, out = flops + f1 + f2, planes
      else:  # bottleneck; the stride on its 3x3 conv (v1.5)
        f1, _ = conv(h, 1, c_in, planes)
        f2, h_out = conv(h, 3, planes, planes, stride)
        f3, _ = conv(h_out, 1, planes, 4 * planes)
        flops, out = flops + f1 + f2 + f3, 4 * planes
      if stride != 1 or c_in != out:
        flops += conv(h, 1, c_in, out, stride)[0]
      c_in, h = out, h_out
  return flops + 2 * c_in * num_classes


def forward_flops(s: dict) -> float:
  if s["arch"] == "vit":
    return vit_forward_flops(s["vit"], s["channels"])
  return resnet_forward_flops(s["resnet"], s["stored_size"], s["channels"], s["num_classes"])
