"""Data sets as host arrays: uint8 images (N, H, W, C) and int32 labels.

Images stay uint8 at their stored size; inside the jitted steps they become
float pixels in [0, 1] (`Trainer.pixels`, what an objective may perturb) and then
model input (`normalize`: resize and normalise), so the device holds the compact form.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Dataset:
  train_images: np.ndarray  # (N, H, W, C) uint8
  train_labels: np.ndarray  # (N,) int32
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int
  # Value of a white pixel in the stored images (255 for 8-bit, 16 for digits).
  pixel_max: float
  class_names: tuple[str, ...]

  def __post_init__(self):
    for split in ("train", "test"):
      images, labels = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
      if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"{split} images must be uint8 (N, H, W, C), got {images.dtype} {images.shape}")
      if labels.shape != images.shape[:1]:
        raise ValueError(f"{split} labels {labels.shape} do not match images {images.shape}")


# name -> number of classes, known before loading (used to validate configs early).
NUM_CLASSES = {"digits": 10, "cifar10": 10, "synthetic": 10}


def load_digits(test_size: float, split_seed: int) -> Dataset:
  """scikit-learn's 8x8 digits (ships with scikit-learn), stratified train/test split."""
  from sklearn import datasets as skd
  from sklearn.model_selection import train_test_split
  d = skd.load_digits()
  images = d.images.astype(np.uint8)[..., None]  # values 0..16
  xtr, xte, ytr, yte = train_test_split(images, d.target.astype(np.int32), test_size=test_size,
                                        stratify=d.target, random_state=split_seed)
  return Dataset(xtr, ytr, xte, yte, num_classes=10, pixel_max=16.0,
                 class_names=tuple(str(i) for i in range(10)))


def load_synthetic(num_train: int, num_test: int, image_size: int, seed: int = 0) -> Dataset:
  """Random uint8 RGB images with random labels, shaped like CIFAR-10 by default.

  For benchmarks and GPU checks of the whole pipeline without downloads.
  """
  r = np.random.default_rng(seed)
  images = lambda n: r.integers(0, 256, (n, image_size, image_size, 3), dtype=np.uint8)
  labels = lambda n: r.integers(0, 10, n).astype(np.int32)
  return Dataset(images(num_train), labels(num_train), images(num_test), labels(num_test),
                 num_classes=10, pixel_max=255.0, class_names=tuple(str(i) for i in range(10)))


def load_cifar10(data_config) -> Dataset:
  """CIFAR-10 through tensorflow-datasets (`tfds_data`; data_dir, prepare, manual_dir)."""
  from jaxunlearn import tfds_data  # lazy: tfds is imported only for CIFAR-10
  arrays, names = tfds_data.read_cifar10(data_config)
  return Dataset(*arrays, num_classes=len(names), pixel_max=255.0, class_names=names)


def load(data_config) -> Dataset:
  if data_config.name == "digits":
    return load_digits(data_config.test_size, data_config.split_seed)
  if data_config.name == "synthetic":
    return load_synthetic(data_config.synthetic.num_train, data_config.synthetic.num_test,
                          data_config.synthetic.image_size)
  if data_config.name == "cifar10":
    return load_cifar10(data_config)
  raise ValueError(f"config.data.name: unknown data set {data_config.name!r}; "
                   f"allowed: {', '.join(NUM_CLASSES)}")


def normalize(pixels_BxHxWxC: jax.Array, image_size: int | None, mean=0.5,
              std=0.5) -> jax.Array:
  """Float pixels in [0, 1] -> model input: bilinear resize (None: none), then normalise.

  With `pixels = uint8 / pixel_max` this is the study's torchvision pipeline
  (Resize bilinear, ToTensor, Normalize(0.5, 0.5)). `mean` and `std` are a number
  or one per channel.
  """
  x = pixels_BxHxWxC
  B, H, W, C = x.shape
  mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
  if image_size is not None and (H, W) != (image_size, image_size):
    x = jax.image.resize(x, (B, image_size, image_size, C), method="bilinear")
  return (x - mean) / std
