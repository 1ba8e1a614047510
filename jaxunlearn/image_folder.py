"""A folder of one's own images, in the common class-per-subfolder layout.

  FOLDER/train/<class>/*.png   training images, one subfolder per class
  FOLDER/test/<class>/*.jpg    test images; every class here must be in train/

`--config.data.name=folder --config.data.folder=FOLDER`. The classes are the
subfolder names of train/, sorted (torchvision's ImageFolder order), so class k is
the k-th name. Images are decoded with Pillow and resized to `data.image_size`
(0: kept, then all must have one size); they are greyscale when every image is,
else RGB. 16-bit greyscale images are scaled to 8 bits by their own depth (Pillow would
clip them at 255). The data set's size is checked against the memory (`datasets.check_fits`)
from the file count and image size, before any image is decoded.
"""
from __future__ import annotations

import os

import numpy as np

from jaxunlearn import datasets, exits, fields

# File types read as images (torchvision ImageFolder's); other files are skipped.
EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
# PIL modes of more than 8 bits per pixel, one channel, and that many bits: scaled to
# 8 bits here, as Pillow's own conversion to "L" clips every value above 255.
DEEP_GREY_MODES = {"I;16": 16, "I;16L": 16, "I;16B": 16, "I;16N": 16}
# PIL modes loaded as one grey channel; every other mode becomes RGB.
GREY_MODES = ("1", "L", "LA", *DEEP_GREY_MODES)
# PIL modes whose value range the file does not state (32-bit integers, floats): refused.
UNSCALED_MODES = ("I", "F", "I;32", "I;32L", "I;32B", "I;32S")


def _files(split_dir: str) -> dict[str, list[str]]:
  """{class: sorted image paths} of one split folder; hidden entries are skipped."""
  out = {}
  for name in sorted(os.listdir(split_dir)):
    class_dir = os.path.join(split_dir, name)
    if name.startswith(".") or not os.path.isdir(class_dir):
      continue
    out[name] = sorted(os.path.join(class_dir, f) for f in os.listdir(class_dir)
                       if not f.startswith(".") and f.lower().endswith(EXTENSIONS))
  return out


def _eight_bit(image):
  """A 16-bit greyscale image as 8-bit "L": value * 255 / (2**16 - 1), rounded."""
  bits = DEEP_GREY_MODES.get(image.mode)
  if bits is None:
    return image
  from PIL import Image
  scaled = np.rint(np.asarray(image, np.float64) * (255 / (2 ** bits - 1)))
  return Image.fromarray(scaled.astype(np.uint8))


def read(folder: str | None, image_size: int) -> datasets.Dataset:
  """Every image under folder/train and folder/test, labelled by its subfolder."""
  if not folder:
    fields.fail("data.folder", "is not set; name the folder holding train/<class>/ and "
                "test/<class>/")
  folder = os.path.expanduser(folder)
  splits = _list_splits(folder)
  classes = _classes(splits, folder)
  paths = [p for split in splits.values() for ps in split.values() for p in ps]
  shape = _image_shape(paths, image_size)
  datasets.check_fits(datasets.planned_nbytes(len(paths), shape))
  pairs = {split: [(p, k) for k, c in enumerate(classes) for p in splits[split].get(c, [])]
           for split in ("train", "test")}
  train_images, train_labels = _load(pairs["train"], shape, image_size)
  test_images, test_labels = _load(pairs["test"], shape, image_size)
  return datasets.Dataset(train_images, train_labels, test_images, test_labels,
                          num_classes=len(classes), pixel_max=255.0, class_names=classes)


def _list_splits(folder: str) -> dict[str, dict[str, list[str]]]:
  """{split: {class: image paths}} of folder/train and folder/test; each must hold images."""
  splits = {}
  for split in ("train", "test"):
    path = os.path.join(folder, split)
    if not os.path.isdir(path):
      fields.fail("data.folder", f"{path} is not a folder; the layout is {folder}/train/<class>/* "
                  f"and {folder}/test/<class>/*")
    splits[split] = _files(path)
    if not any(splits[split].values()):
      fields.fail("data.folder", f"no images in {path}/<class>/ (looked for "
                  f"{', '.join(EXTENSIONS)})")
  return splits


def _classes(splits: dict[str, dict[str, list[str]]], folder: str) -> tuple[str, ...]:
  """The class names (train/'s subfolders, sorted); each must have training images."""
  classes = tuple(splits["train"])
  if empty := [c for c, paths in splits["train"].items() if not paths]:
    fields.fail("data.folder", f"class {empty[0]!r} has no images in {folder}/train/{empty[0]}; "
                "add some or remove the folder")
  if extra := [c for c in splits["test"] if c not in classes]:
    fields.fail("data.folder", f"test class {extra[0]!r} ({folder}/test/{extra[0]}) is not in "
                f"{folder}/train; every test class needs training images")
  return classes


def _image_shape(paths: list[str], image_size: int) -> tuple[int, int, int]:
  """(height, width, channels) every image is loaded at, from the files' headers alone.

  Pillow reads the pixels lazily, so a damaged or unusable file, or (without
  resizing) images of several sizes, are found before anything is decoded.
  """
  from PIL import Image
  sizes, grey = {}, True
  for p in paths:
    try:
      with Image.open(p) as image:
        sizes.setdefault(image.size, p)
        grey = grey and image.mode in GREY_MODES
        mode = image.mode
    except (OSError, Image.DecompressionBombError) as e:
      fields.fail("data.folder", f"cannot read image {p}: {e}")
    if mode in UNSCALED_MODES:
      fields.fail("data.folder", f"{p} has {mode!r} pixels (32-bit or floating point), whose "
                  "range the file does not state; save it with 8 or 16 bits per channel")
  if not image_size and len(sizes) > 1:
    (a, pa), (b, pb) = list(sizes.items())[:2]
    fields.fail("data.image_size", f"the images differ in size ({pa}: {a[0]}x{a[1]}, {pb}: "
                f"{b[0]}x{b[1]}); set data.image_size to resize them all when loading")
  width, height = (image_size, image_size) if image_size else next(iter(sizes))
  return height, width, 1 if grey else 3


def _load(pairs: list[tuple[str, int]], shape: tuple[int, int, int], image_size: int):
  """The decoded images (N, H, W, C) uint8 and labels (N,) int32 of (path, label) pairs."""
  from PIL import Image
  images = np.empty((len(pairs), *shape), np.uint8)
  for i, (p, _) in enumerate(pairs):
    # The header read fine; the pixels may still be cut short or damaged.
    try:
      with Image.open(p) as image:
        images[i] = datasets.image_array(_eight_bit(image), image_size, shape[2])
    except (OSError, ValueError, SyntaxError) as e:
      fields.fail("data.folder", f"cannot decode image {p}: {exits.one_line(e)}; replace "
                  "or remove the file")
  return images, np.array([k for _, k in pairs], np.int32)
