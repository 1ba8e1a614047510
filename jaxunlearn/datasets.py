"""Data sets as host arrays: uint8 images (N, H, W, C) and int32 labels.

Sources, by `config.data.name`: "digits" (scikit-learn's 8x8 digits, offline),
"synthetic" (random arrays), "folder" (a folder of images, `image_folder`) or the
name of any TFDS image-classification data set (`tfds_data`: cifar10, cifar100,
svhn_cropped, mnist, ...). The class count, names, image size and channels come
from the source itself (TFDS metadata, folder names), so the checks that need them
(`check_config`) run once the data is loaded, before anything is written.

Images stay uint8 at their stored size; inside the jitted steps they become
float pixels in [0, 1] (`Trainer.pixels`, what an objective may perturb) and then
model input (`normalize`: resize and normalise), so the device holds the compact form.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from jaxunlearn import fields

# The sources that are not TFDS names; any other name is looked up in TFDS.
SOURCES = ("digits", "synthetic", "folder")
# TFDS names: lowercase, an optional builder config and version ("emnist/balanced:3.1.0").
TFDS_NAME = re.compile(r"[a-z][a-z0-9_]*(/[a-z0-9_.-]+)?(:[0-9]+\.[0-9]+\.[0-9]+)?")
# At most this fraction of a device's memory may hold the data set (kept whole on every
# device); the rest is for parameters, optimizer state and activations.
FIT_FRACTION = 0.8


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
  # When the labels are coarse classes that group finer ones (CIFAR-100's 20 super-classes,
  # `data.label=coarse`): each example's fine class and the fine class names (every fine
  # class lies in one coarse class); None otherwise.
  train_fine_labels: np.ndarray | None = None  # (N,) int32
  test_fine_labels: np.ndarray | None = None
  fine_class_names: tuple[str, ...] | None = None

  def __post_init__(self):
    # One's own arrays (`pipeline.train_and_evaluate(data=...)`) are checked here, so a
    # wrong one fails in one line at construction, not as a traceback deep in a step.
    if (not isinstance(self.num_classes, (int, np.integer)) or isinstance(self.num_classes, bool)
        or self.num_classes < 1):
      raise ValueError(f"num_classes must be an integer >= 1, got {self.num_classes!r}")
    if not (isinstance(self.pixel_max, (int, float, np.number)) and 0 < self.pixel_max < math.inf):
      raise ValueError(f"pixel_max (a white pixel's value, 255 for 8-bit images) must be a "
                       f"positive number, got {self.pixel_max!r}")
    fine_classes = None if self.fine_class_names is None else len(self.fine_class_names)
    for split in ("train", "test"):
      images, labels = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
      if not isinstance(images, np.ndarray) or images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"{split} images must be a uint8 numpy array (N, H, W, C), got "
                         f"{_described(images)}; greyscale (N, H, W) ones need images[..., None]")
      if not images.size:
        raise ValueError(f"{split} images {images.shape} hold no pixels; each split needs at "
                         "least one image")
      _check_labels(f"{split} labels", labels, images.shape[:1], self.num_classes)
      fine = getattr(self, f"{split}_fine_labels")
      if (fine is None) != (self.fine_class_names is None):
        raise ValueError(f"{split} fine labels and fine_class_names must be given together")
      if fine is not None:
        _check_labels(f"{split} fine labels", fine, labels.shape, fine_classes)
    if len(self.class_names) != self.num_classes:
      raise ValueError(f"{len(self.class_names)} class names for {self.num_classes} classes")

  def fingerprint(self) -> str:
    """A digest of every array and the class names: equal only for the same data set."""
    arrays = [getattr(self, f.name) for f in dataclasses.fields(self)]
    return digest([a for a in arrays if isinstance(a, np.ndarray)]
                  + [np.frombuffer(repr((self.class_names, self.fine_class_names,
                                         self.pixel_max)).encode(), np.uint8)])

  @property
  def nbytes(self) -> int:
    """Bytes of every array (images and labels), as each device holds them."""
    arrays = (getattr(self, f.name) for f in dataclasses.fields(self))
    return sum(a.nbytes for a in arrays if isinstance(a, np.ndarray))


def _described(x) -> str:
  """What an argument is, for a message: an array's dtype and shape, else its type."""
  if isinstance(x, np.ndarray):
    return f"{x.dtype} {x.shape}"
  return f"a {type(x).__name__}"


def _check_labels(what: str, labels, shape: tuple[int, ...], num_classes: int) -> None:
  """Integer class indices in [0, num_classes), one per image: else one ValueError line."""
  if not isinstance(labels, np.ndarray) or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"{what} must be an integer numpy array, got {_described(labels)}; "
                     "pass np.asarray(labels, np.int32)")
  if labels.shape != shape:
    raise ValueError(f"{what} {labels.shape} do not match the images: one label per image, "
                     f"shape {shape}")
  low, high = int(labels.min()), int(labels.max())
  if low < 0 or high >= num_classes:
    bad = low if low < 0 else high
    raise ValueError(f"{what} hold {bad}, outside 0..{num_classes - 1} for {num_classes} "
                     "classes; labels are class indices (set num_classes and class_names to "
                     "cover them)")


def digest(arrays) -> str:
  """CRC-32 of a list of arrays' shapes, dtypes and bytes, as 8 hex digits."""
  crc = 0
  for a in arrays:
    a = np.ascontiguousarray(a)
    crc = zlib.crc32(repr((a.shape, str(a.dtype))).encode(), crc)
    crc = zlib.crc32(a.reshape(-1).view(np.uint8), crc)
  return f"{crc:08x}"


# digits with data.label "coarse": digit d is in coarse class d // 2, named by its pair.
DIGITS_COARSE = tuple(f"{2 * k}-{2 * k + 1}" for k in range(5))


def load_digits(test_size: float, split_seed: int, coarse: bool = False) -> Dataset:
  """scikit-learn's 8x8 digits (ships with scikit-learn), stratified train/test split.

  `coarse`: 5 classes of digit pairs ("0-1", "2-3", ..., digit // 2) with the digits
  as fine labels, so sub-class forgetting runs offline, as CIFAR-20 does on CIFAR-100.
  """
  from sklearn import datasets as skd
  from sklearn.model_selection import train_test_split
  d = skd.load_digits()
  images = d.images.astype(np.uint8)[..., None]  # values 0..16
  with fields.blamed_on("data.test_size", test_size,
                         "scikit-learn's stratified train/test split"):
    xtr, xte, ytr, yte = train_test_split(images, d.target.astype(np.int32), test_size=test_size,
                                          stratify=d.target, random_state=split_seed)
  digits = tuple(str(i) for i in range(10))
  if coarse:
    return Dataset(xtr, ytr // 2, xte, yte // 2, num_classes=5, pixel_max=16.0,
                   class_names=DIGITS_COARSE, train_fine_labels=ytr, test_fine_labels=yte,
                   fine_class_names=digits)
  return Dataset(xtr, ytr, xte, yte, num_classes=10, pixel_max=16.0, class_names=digits)


def load_synthetic(num_train: int, num_test: int, image_size: int, seed: int = 0) -> Dataset:
  """Random uint8 RGB images with random labels, shaped like CIFAR-10 by default.

  For benchmarks and GPU checks of the whole pipeline without downloads.
  """
  r = np.random.default_rng(seed)
  images = lambda n: r.integers(0, 256, (n, image_size, image_size, 3), dtype=np.uint8)
  labels = lambda n: r.integers(0, 10, n).astype(np.int32)
  return Dataset(images(num_train), labels(num_train), images(num_test), labels(num_test),
                 num_classes=10, pixel_max=255.0, class_names=tuple(str(i) for i in range(10)))


# PIL's mode for each channel count a data set may have.
MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def image_array(image, image_size: int, channels: int) -> np.ndarray:
  """A PIL image as uint8 (H, W, channels), resized to image_size x image_size (0: kept).

  Bilinear, as torchvision's `Resize` on PIL images (the references' loaders); the aspect
  ratio is not kept. Every source decodes through here, so all resize alike.
  """
  from PIL import Image
  if image.mode != MODES[channels]:
    image = image.convert(MODES[channels])
  if image_size and image.size != (image_size, image_size):
    image = image.resize((image_size, image_size), Image.BILINEAR)
  return np.asarray(image).reshape(image.height, image.width, channels)


def resize(images_NxHxWxC: np.ndarray, image_size: int) -> np.ndarray:
  """uint8 images resized as `image_array` does (0, or their size already: unchanged)."""
  from PIL import Image
  N, H, W, C = images_NxHxWxC.shape
  if not image_size or (H, W) == (image_size, image_size):
    return images_NxHxWxC
  out = np.empty((N, image_size, image_size, C), np.uint8)
  for i, x in enumerate(images_NxHxWxC):
    out[i] = image_array(Image.fromarray(x[..., 0] if C == 1 else x), image_size, C)
  return out


def load(data_config) -> Dataset:
  """The data set `config.data` names, its images resized to `data.image_size` (0: kept),
  less `data.hold_out` of its training set (a stratified part, by `data.split_seed`)."""
  data = _load_source(data_config)
  if not data_config.hold_out:
    return data
  keep, _ = stratified_split(finest_labels(data), data_config.hold_out, data_config.split_seed,
                             "data.hold_out")
  return train_subset(data, keep)


def finest_labels(data: Dataset) -> np.ndarray:
  """The labels a stratified split keeps in proportion: the finest the data set has."""
  return data.train_labels if data.train_fine_labels is None else data.train_fine_labels


def stratified_split(labels_N: np.ndarray, fraction: float, seed: int, field: str):
  """Sorted indices (kept, split off) of a seeded split of `fraction` of the examples,
  every class in proportion (scikit-learn's train_test_split); one line if it cannot be."""
  from sklearn.model_selection import train_test_split
  n = len(labels_N)
  try:
    keep, split = train_test_split(np.arange(n), test_size=fraction, stratify=labels_N,
                                   random_state=seed)
  except ValueError as e:
    fields.fail(field, f"{fraction:g} of {n} training examples cannot be split stratified by "
                f"class ({e}); choose another fraction")
  return np.sort(keep), np.sort(split)


def train_subset(data: Dataset, idx: np.ndarray) -> Dataset:
  """The data set with only the training examples `idx` (fine labels follow)."""
  fine = data.train_fine_labels
  return dataclasses.replace(data, train_images=data.train_images[idx],
                             train_labels=data.train_labels[idx],
                             train_fine_labels=None if fine is None else fine[idx])


def _load_source(data_config) -> Dataset:
  """The data set `config.data` names, its images resized to `data.image_size` (0: kept)."""
  name, size = data_config.name, data_config.image_size
  label = data_config.label
  if name in SOURCES and label and (name, label) != ("digits", "coarse"):
    fields.fail("data.label", f"{name} has one set of labels; set data.label to \"\" "
                f"(other labels are for TFDS data sets such as cifar100; digits also takes "
                f"\"coarse\")")
  if name == "digits":
    d = load_digits(data_config.test_size, data_config.split_seed, coarse=label == "coarse")
  elif name == "synthetic":
    s = data_config.synthetic
    d = load_synthetic(s.num_train, s.num_test, s.image_size)
  elif name == "folder":
    from jaxunlearn import image_folder  # lazy: Pillow only when used
    return image_folder.read(data_config.folder, size)
  else:
    from jaxunlearn import tfds_data  # lazy: tensorflow_datasets only when used
    return tfds_data.read(data_config)
  return dataclasses.replace(d, train_images=resize(d.train_images, size),
                             test_images=resize(d.test_images, size))


def check_name(name) -> None:
  """`data.name` can name a data set: a source of ours or a TFDS name (found when loading)."""
  if name not in SOURCES and not TFDS_NAME.fullmatch(name):
    fields.fail("data.name", f"{name!r} is not a data set name; allowed: "
                f"{', '.join(SOURCES)} or a TFDS name (cifar10, cifar100, svhn_cropped, "
                "mnist, ...)")


def normalization(data_config, num_channels: int | None = None):
  """(mean, std): `data.mean` and `data.std` ("0.5", or one per channel "0.49,0.48,0.45").

  Without `num_channels` the fields' syntax is checked and their values returned as
  given; with it, one number is repeated for every channel and a list must have one
  entry per channel. A bad field raises a one-line ValueError naming it.
  """
  out = []
  for key in ("mean", "std"):
    field, text = f"data.{key}", data_config[key]
    try:
      values = tuple(float(v) for v in text.split(","))
    except (AttributeError, ValueError):
      values = ()
    if not values or not all(math.isfinite(v) for v in values):
      fields.fail(field, f"must be one number or one per channel, comma-separated (\"0.5\" or "
                  f"\"0.4914,0.4822,0.4465\"), got {text!r}")
    if key == "std" and min(values) <= 0:
      fields.fail(field, f"must be > 0 (input is divided by it), got {text!r}")
    if num_channels is not None:
      if len(values) not in (1, num_channels):
        fields.fail(field, f"has {len(values)} entries but the images have {num_channels} "
                    f"channel(s); give 1 or {num_channels}")
      values = values * num_channels if len(values) == 1 else values
    out.append(values)
  return tuple(out)


def size_text(nbytes: float) -> str:
  """Bytes as GiB, MiB or KiB, two decimals."""
  for unit, scale in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
    if nbytes >= scale:
      return f"{nbytes / scale:.2f} {unit}"
  return f"{nbytes} bytes"


def host_memory() -> int:
  """Bytes of the host's memory available now (what CPU devices' copies must fit in)."""
  return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def device_memory(device) -> int | None:
  """Bytes an accelerator can allocate; None where JAX does not say (the CPU)."""
  stats = device.memory_stats()
  return (stats or {}).get("bytes_limit")


def planned_nbytes(num_examples: int, image_shape, num_labels: int = 1) -> int:
  """Bytes a `Dataset` of that many uint8 images and int32 label arrays will take (`nbytes`):
  what a loader checks (`check_fits`) before it reads anything."""
  return num_examples * (math.prod(image_shape) + 4 * num_labels)


def check_fits(data: Dataset | int, devices=None, limit_bytes: int | None = None) -> None:
  """Refuses, in one line, a data set too large for the devices' memory (ValueError).

  The data lives whole on every device, as uint8 (`device_data`: replicated), and may
  take at most FIT_FRACTION of a device's memory: an accelerator's `bytes_limit`. Devices
  without memory statistics (the CPU) share the host's available memory, one copy each.
  `data`: the data set, or the bytes it will take (`planned_nbytes`: the loaders check
  before reading). `limit_bytes` stands for each device's (or the host's) memory, for
  tests. `devices`: default this process's devices, which hold its copies.
  """
  devices = list(jax.local_devices() if devices is None else devices)
  need = data.nbytes if isinstance(data, Dataset) else int(data)
  memory = [device_memory(d) for d in devices]
  if all(memory):  # accelerators: each holds one copy in its own memory
    have, i = min((m if limit_bytes is None else limit_bytes, i) for i, m in enumerate(memory))
    copies, where = 1, f"{devices[i].device_kind} ({devices[i].platform}) has {size_text(have)}"
    fewer = ""
  else:  # devices on the host: every copy in the host's memory
    have = host_memory() if limit_bytes is None else limit_bytes
    copies, where = len(devices), f"the host has {size_text(have)} available"
    fewer = ", fewer CPU devices" if copies > 1 else ""
  if need * copies > FIT_FRACTION * have:
    held = f", {copies} copies in host memory" if copies > 1 else ""
    raise ValueError(
        f"The data set does not fit: its images and labels take {size_text(need)} as uint8, kept "
        f"whole on each of {len(devices)} device(s){held}, but {where} (at most "
        f"{FIT_FRACTION:.0%} of it for data); set a smaller data.image_size or use fewer "
        f"images{fewer} or devices with more memory")


def check_batch_sizes(config, num_train: int) -> None:
  """No stage's training batch is larger than the training set: such a batch is mostly
  padding, computed and held for nothing (and the field was likely meant for another
  data set). Every pool a stage draws from lies in the training set; a batch larger than
  the forget pool alone is the references' single short batch per epoch, and stays."""
  from jaxunlearn import config as config_lib  # it imports this module: here, not above
  sized = [("batch_size", config.batch_size)]
  for section in ("train", *config_lib.method_names(config)):
    sized += [(f"{section}.{key}", value) for key, value in config[section].items()
              if key.endswith("batch_size") and isinstance(value, int)]
  for field, value in sized:
    if value > num_train:
      fields.fail(field, f"{value:,} is larger than the training set ({num_train:,} "
                  f"examples); set it to at most {num_train:,}")


def check_config(config, data: Dataset, devices=None) -> None:
  """The checks of config fields that need the loaded data, before anything is written.

  forget_class within the data set's classes and not all of them (scenario "class"),
  data.mean / data.std with 1 entry or one per channel, no training batch larger than the
  training set (`check_batch_sizes`) and the data set fitting in the devices' memory
  (`check_fits`).
  """
  n, name = data.num_classes, config.data.name
  if config.scenario == "class":
    classes = {int(v) for v in fields.names(str(config.forget_class))}
    for k in sorted(classes):
      if not 0 <= k < n:
        fields.fail("forget_class", f"{k} is out of range; allowed: 0..{n - 1} for {name}")
    if len(classes) == n:
      fields.fail("forget_class", f"forgets every class of {name}; leave at least one")
  normalization(config.data, data.train_images.shape[-1])
  check_batch_sizes(config, len(data.train_labels))
  check_fits(data, devices)
  from jaxunlearn import sizes  # it reads this module's sizes: imported here, not above
  sizes.check_steps(config, len(data.train_labels))


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
