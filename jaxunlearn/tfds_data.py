"""CIFAR-10 from TensorFlow Datasets (tfds), read without TensorFlow.

Reading uses tfds' array_record data source: it needs tensorflow-datasets,
array_record and Pillow, but not TensorFlow. Preparing the files once does need
TensorFlow (tfds 4.9.10 reads the archive with tf.io.gfile and encodes the
images with tf.image), so it is a separate step:

  pip install 'jaxunlearn[prepare]'
  python -m jaxunlearn.tfds_data --data_dir DIR [--manual_dir DIR_WITH_TARBALL]

tensorflow_datasets is imported inside the functions: the core package imports
without it.
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import io
import os
import sys

import numpy as np


NAME = "cifar10"
SOURCE_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
ARCHIVE = "cifar-10-binary.tar.gz"
# Only for `write_fake_cifar10`; real names come from the prepared dataset info.
CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer",
               "dog", "frog", "horse", "ship", "truck")
# What tfds 4.9.10 imports while preparing: tensorflow (gfile, PNG encoding) and
# importlib_resources (to find the builder's checksums; tfds does not declare it
# on Python >= 3.9). Checked up front so a missing one fails at once, offline.
PREPARE_MODULES = ("tensorflow", "importlib_resources")
PREPARE_INSTALL = "`pip install 'jaxunlearn[prepare]'`"
# Records per data-source call: the batched call reads the array_record shards
# in parallel; per-example calls were ~3x slower on 50k examples.
READ_BATCH = 2048
# Offline, tfds' downloader retries for ~3.5 minutes before failing (measured);
# one short probe first turns that into an immediate, actionable error.
PROBE_TIMEOUT_S = 10


class Cifar10NotReadyError(RuntimeError):
  """CIFAR-10 cannot be read or prepared; the message says what to run."""


def _import_tfds():
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise Cifar10NotReadyError(
        f"CIFAR-10 needs tensorflow-datasets ({e}): "
        "`pip install tensorflow-datasets array-record pillow`") from None
  return tfds


def _root(builder) -> str:
  # builder.data_dir is <root>/cifar10/<version>; commands take the root.
  return str(builder.data_path.parent.parent)


def _prepare_command(root: str, manual_dir: str | None) -> str:
  manual = f" --manual_dir {manual_dir}" if manual_dir else ""
  return f"`python -m jaxunlearn.tfds_data --data_dir {root}{manual}`"


def _manual_hint(manual_dir: str | None) -> str:
  where = manual_dir or "a folder"
  return (f"offline, download {SOURCE_URL} by hand into {where} and pass it as "
          "config.data.manual_dir / --manual_dir")


def missing_prepare_modules() -> list[str]:
  return [m for m in PREPARE_MODULES if importlib.util.find_spec(m) is None]


def _probe_download(root: str, manual_dir: str | None) -> None:
  """Raises at once if the archive is neither local nor reachable."""
  local = [os.path.join(root, "downloads", "*cifar-10-binary*.tar.gz")]  # tfds' cache
  if manual_dir:
    local.append(os.path.join(manual_dir, ARCHIVE))
  if any(glob.glob(pattern) for pattern in local):
    return  # tfds takes it from there, no network needed
  import requests  # a tfds dependency; honours the *_PROXY variables like tfds
  try:
    requests.head(SOURCE_URL, timeout=PROBE_TIMEOUT_S, allow_redirects=True)
  except requests.RequestException as e:
    raise Cifar10NotReadyError(
        f"Cannot reach {SOURCE_URL} to prepare CIFAR-10 in {root} ({type(e).__name__}); "
        f"{_manual_hint(manual_dir)}, then run {_prepare_command(root, manual_dir)}") from None


def _check_random_access(builder) -> None:
  """Prepared data must hold array_record files: tfrecord needs TF to read."""
  formats = {f.value for f in builder.info.available_file_formats()}
  if "array_record" not in formats:
    raise Cifar10NotReadyError(
        f"CIFAR-10 at {builder.data_dir} is stored as {sorted(formats)}, but reading "
        f"without TensorFlow needs array_record: delete that folder or use another "
        f"data_dir, then run {_prepare_command(_root(builder), None)}")


def prepare_cifar10(data_dir: str | None, manual_dir: str | None = None) -> str:
  """Downloads (or takes from manual_dir) and writes CIFAR-10 as array_record.

  A no-op if already prepared. Returns the prepared variant folder.
  """
  tfds = _import_tfds()
  builder = tfds.builder(NAME, data_dir=data_dir)
  if builder.is_prepared():
    _check_random_access(builder)
    return str(builder.data_dir)
  root = _root(builder)
  if missing := missing_prepare_modules():
    raise Cifar10NotReadyError(
        f"Preparing CIFAR-10 needs TensorFlow (missing: {', '.join(missing)}): run "
        f"{PREPARE_INSTALL} then {_prepare_command(root, manual_dir)}, or prepare it "
        f"on a machine with TensorFlow and copy {root}/{NAME} here") from None
  _probe_download(root, manual_dir)
  # file_format on the builder (not tfds' tfrecord default): data_source only
  # reads random-access formats. Also skips tfds' GCS mirror, which is tfrecord.
  builder = tfds.builder(NAME, data_dir=data_dir, file_format="array_record")
  config = tfds.download.DownloadConfig(manual_dir=manual_dir)
  try:
    builder.download_and_prepare(download_config=config)
  except Exception as e:  # network, checksum, disk: all end in the same advice
    cause = (str(e).strip().splitlines() or [""])[0][:200]
    raise Cifar10NotReadyError(
        f"Could not prepare CIFAR-10 in {root} ({type(e).__name__}: {cause}); "
        f"{_manual_hint(manual_dir)}, then run {_prepare_command(root, manual_dir)}") from e
  return str(builder.data_dir)


def _read_split(source, image_shape) -> tuple[np.ndarray, np.ndarray]:
  """All examples of one data source -> uint8 (N, H, W, C), int32 (N,)."""
  from PIL import Image
  n = len(source)
  images = np.empty((n, *image_shape), np.uint8)
  labels = np.empty((n,), np.int32)
  for start in range(0, n, READ_BATCH):
    keys = list(range(start, min(start + READ_BATCH, n)))
    for i, example in zip(keys, source.__getitems__(keys)):
      # PNG bytes (decoding skipped in tfds): one PIL call, without tfds' per-
      # feature decode overhead (~25% of the read time).
      images[i] = np.asarray(Image.open(io.BytesIO(example["image"])))
      labels[i] = example["label"]
  return images, labels


def read_cifar10(data_config) -> tuple[tuple[np.ndarray, ...], tuple[str, ...]]:
  """CIFAR-10 train (50k) / test (10k) from tfds array_record files.

  Returns ((train images, train labels, test images, test labels), class names);
  `datasets.load` makes them a `Dataset`.

  Uses data_config.data_dir (None: tfds default), .prepare (prepare if missing)
  and .manual_dir (folder holding cifar-10-binary.tar.gz, for offline preparing).
  """
  tfds = _import_tfds()
  data_dir, manual_dir = data_config.data_dir, data_config.manual_dir
  # The builder (not tfds.data_source) so we can check and prepare first:
  # data_source would fail with a bare KeyError on missing data.
  builder = tfds.builder(NAME, data_dir=data_dir)
  if not builder.is_prepared():
    if not data_config.prepare:
      raise Cifar10NotReadyError(
          f"CIFAR-10 not found at {builder.data_dir}: prepare it once with "
          f"{PREPARE_INSTALL} then {_prepare_command(_root(builder), manual_dir)} "
          f"({_manual_hint(manual_dir)}), or set config.data.prepare=True") from None
    prepare_cifar10(data_dir, manual_dir)
    builder = tfds.builder(NAME, data_dir=data_dir)  # re-reads the written info
  _check_random_access(builder)
  skip = tfds.decode.SkipDecoding()
  train, test = builder.as_data_source(split=["train", "test"],
                                       decoders={"image": skip, "id": skip})
  shape = builder.info.features["image"].shape
  train_images, train_labels = _read_split(train, shape)
  test_images, test_labels = _read_split(test, shape)
  names = tuple(builder.info.features["label"].names)
  return (train_images, train_labels, test_images, test_labels), names


def write_fake_cifar10(data_dir: str, num_train: int, num_test: int, seed: int = 0) -> str:
  """Writes a small random CIFAR-10 in tfds' array_record layout, without TF.

  For tests and offline smoke runs: `load_cifar10` reads it exactly like the real
  data. Labels cycle through all 10 classes (shuffled). Returns the variant folder.
  """
  from PIL import Image
  tfds = _import_tfds()
  builder = tfds.builder(NAME, data_dir=data_dir, file_format="array_record")
  builder.data_path.mkdir(parents=True, exist_ok=True)
  info = builder.info
  info.features["label"].names = list(CLASS_NAMES)
  rng = np.random.default_rng(seed)

  def png(image):
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="png")
    return buf.getvalue()  # encoded bytes: tfds' own encoder would need TF

  def examples(split, n):
    labels = rng.permutation(np.arange(n) % len(CLASS_NAMES))
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    return [{"id": f"{split}_{i:05d}", "image": png(images[i]), "label": int(labels[i])}
            for i in range(n)]

  writer = tfds.core.SequentialWriter(info, max_examples_per_shard=max(num_train, num_test, 1),
                                      file_format="array_record")
  writer.initialize_splits(["train", "test"])
  writer.add_examples({"train": examples("train", num_train), "test": examples("test", num_test)})
  writer.close_all()
  return str(builder.data_dir)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m jaxunlearn.tfds_data",
      description="Prepare CIFAR-10 once as tfds array_record files (needs TensorFlow).")
  parser.add_argument("--data_dir", default=None, help="tfds data_dir (default: tfds default)")
  parser.add_argument("--manual_dir", default=None,
                      help=f"folder holding a hand-downloaded {ARCHIVE} (offline)")
  args = parser.parse_args(argv)
  try:
    print(f"CIFAR-10 ready at {prepare_cifar10(args.data_dir, args.manual_dir)}")
  except Cifar10NotReadyError as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  main()
