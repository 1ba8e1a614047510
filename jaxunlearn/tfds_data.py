"""TFDS image-classification data sets, read without TensorFlow.

Any TFDS data set with an image and a class label, by its TFDS name (cifar10,
cifar100, svhn_cropped, mnist, fashion_mnist, ...). What we know of it comes from
its own metadata, written next to the prepared files (dataset_info.json,
features.json, the label names): the classes and their names, the image size and
channels, the splits. Nothing about a data set is tabled here but the display
names of a few and CIFAR-100's label aliases.

Reading uses tfds' array_record data source: it needs tensorflow-datasets,
array_record and Pillow, but not TensorFlow. Preparing the files once does need
TensorFlow (tfds 4.9.10 reads the archives with tf.io.gfile and encodes the
images with tf.image), so it is a separate step:

  pip install 'jaxunlearn[prepare]'
  python -m jaxunlearn.tfds_data --name cifar100 --data_dir DIR [--manual_dir DIR_WITH_ARCHIVES]

tensorflow_datasets is imported inside the functions: the core package imports
without it.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import glob
import importlib.util
import inspect
import io
import logging
import os
import re
import sys

import numpy as np

from jaxunlearn import datasets, fields

# Names in messages ("CIFAR-10 not found at ..."); any other data set goes by its TFDS name.
DISPLAY_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "svhn_cropped": "SVHN",
                 "mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}
# `data.label` values that are not feature names: CIFAR-100's fine and coarse
# (CIFAR-20) labels, as the unlearning papers call them.
LABEL_ALIASES = {"cifar100": {"fine": "label", "coarse": "coarse_label"}}
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
# How to find and prepare a data set, for the line that refuses an unknown name.
LIST_AND_PREPARE = ("TFDS' image-classification data sets are listed at "
                    "https://www.tensorflow.org/datasets/catalog/overview#image_classification; "
                    "prepare one once with `python -m jaxunlearn.tfds_data --name NAME "
                    "--data_dir DIR`")
# Offline, tfds' downloader retries for ~3.5 minutes before failing (measured);
# one short probe first turns that into an immediate, actionable error.
PROBE_TIMEOUT_S = 10


class DataNotReadyError(RuntimeError):
  """A TFDS data set cannot be read or prepared; the message says what to run."""


def title(name: str) -> str:
  return DISPLAY_NAMES.get(name, name)


def _import_tfds(name: str):
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise DataNotReadyError(
        f"{title(name)} needs tensorflow-datasets ({e}): "
        "`pip install tensorflow-datasets array-record pillow`") from None
  return tfds


@contextlib.contextmanager
def _quiet_lookup():
  """Drops tfds' log records while it looks a data set up ("Variant folder ... has no
  dataset_info.json"): what they say, our one line says with the command to run."""
  def not_tfds(record):
    return f"{os.sep}tensorflow_datasets{os.sep}" not in record.pathname
  logger = logging.getLogger("absl")  # tfds logs through absl
  logger.addFilter(not_tfds)
  try:
    yield
  finally:
    logger.removeFilter(not_tfds)


def _is_prepared(builder) -> bool:
  with _quiet_lookup():  # a missing variant folder is our error's to say
    return builder.is_prepared()


def _builder(tfds, name: str, data_dir: str | None, **kwargs):
  try:
    with _quiet_lookup():
      return tfds.builder(name, data_dir=data_dir, **kwargs)
  except tfds.core.registered.DatasetNotFoundError:
    known = (*datasets.SOURCES, *tfds.list_builders(with_community_datasets=False))
    near = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    fields.fail("data.name", f"unknown data set {name!r}: neither {', '.join(datasets.SOURCES)} "
                f"nor a TFDS data set{'; closest: ' + ', '.join(near) if near else ''}; "
                f"{LIST_AND_PREPARE}")
  except (AssertionError, ValueError) as e:  # tfds has the data set, not that version/config
    if not set(":/") & set(name):
      raise
    _variant_error(tfds, name, e)


def _variant_error(tfds, name: str, e: Exception):
  """One line for a version (name:1.2.3) or builder config (name/config) tfds lacks."""
  base = re.split("[:/]", name)[0]
  # tfds' first line ends with the reason; the lists it announces follow on other lines.
  reason = (str(e).strip().splitlines() or [""])[0].rsplit('": ', 1)[-1]
  reason = reason.split(" Here are")[0].strip()
  configs = list(tfds.builder_cls(base).builder_configs or ())
  shown = ", ".join(f"{base}/{c}" for c in configs[:6]) + (", ..." if len(configs) > 6 else "")
  fix = (f"set it to one of {shown} (optionally :<version>)" if configs else
         f"{base} has no builder configs; set it to {base!r}, or {base}:<version> of one tfds has")
  fields.fail("data.name", f"{name!r}: {reason or type(e).__name__}; {fix}")


def _sources(tfds, builder) -> list[tuple[str, str]]:
  """(url, file name) of each file tfds downloads to prepare `builder` ([] if unknown)."""
  try:
    infos = builder.url_infos or {}
  except ImportError:
    # tfds finds its checksums file through importlib_resources, a `prepare` extra; the
    # same two places, looked up directly, so messages can name the files without it.
    cls = type(builder)
    paths = [os.path.join(str(tfds.core.utils.tfds_path()), "url_checksums", f"{cls.name}.txt"),
             os.path.join(os.path.dirname(inspect.getfile(cls)), "checksums.tsv")]
    path = next((p for p in paths if os.path.exists(p)), None)
    infos = tfds.core.download.checksums.load_url_infos(path) if path else {}
  return [(url, info.filename or url.rsplit("/", 1)[-1]) for url, info in sorted(infos.items())]


def _prepare_command(name: str, root: str, manual_dir: str | None) -> str:
  manual = f" --manual_dir {manual_dir}" if manual_dir else ""
  return f"`python -m jaxunlearn.tfds_data --name {name} --data_dir {root}{manual}`"


def _manual_hint(sources, manual_dir: str | None) -> str:
  if not sources:
    return "offline, prepare it on a machine with network access and copy its folder here"
  where = manual_dir or "a folder"
  return (f"offline, download {' and '.join(url for url, _ in sources)} by hand into {where} "
          "and pass it as config.data.manual_dir / --manual_dir")


def missing_prepare_modules() -> list[str]:
  return [m for m in PREPARE_MODULES if importlib.util.find_spec(m) is None]


def _is_local(root: str, manual_dir: str | None, filename: str) -> bool:
  """A file tfds would take from manual_dir or from its own download cache."""
  stem = filename.split(".")[0]  # the cache names files <host>_<path><hash>.<ext>
  return bool((manual_dir and os.path.exists(os.path.join(manual_dir, filename)))
              or glob.glob(os.path.join(root, "downloads", f"*{stem}*")))


def _probe_download(name: str, root: str, manual_dir: str | None, sources) -> None:
  """Raises at once if a file to download is neither local nor reachable."""
  missing = [url for url, filename in sources if not _is_local(root, manual_dir, filename)]
  if not missing:
    return  # tfds takes them from there, no network needed
  import requests  # a tfds dependency; honours the *_PROXY variables like tfds
  try:
    requests.head(missing[0], timeout=PROBE_TIMEOUT_S, allow_redirects=True)
  except requests.RequestException as e:
    raise DataNotReadyError(
        f"Cannot reach {missing[0]} to prepare {title(name)} in {root} ({type(e).__name__}); "
        f"{_manual_hint(sources, manual_dir)}, then run "
        f"{_prepare_command(name, root, manual_dir)}") from None


def _check_random_access(name: str, builder) -> None:
  """Prepared data must hold array_record files: tfrecord needs TF to read."""
  formats = {f.value for f in builder.info.available_file_formats()}
  if "array_record" not in formats:
    raise DataNotReadyError(
        f"{title(name)} at {builder.data_dir} is stored as {sorted(formats)}, but reading "
        f"without TensorFlow needs array_record: delete that folder or use another "
        f"data_dir, then run {_prepare_command(name, builder.data_dir_root, None)}")


def prepare(name: str, data_dir: str | None, manual_dir: str | None = None) -> str:
  """Downloads (or takes from manual_dir) and writes TFDS data set `name` as array_record.

  A no-op if already prepared. Returns the prepared variant folder.
  """
  tfds = _import_tfds(name)
  builder = _builder(tfds, name, data_dir)
  if _is_prepared(builder):
    _check_random_access(name, builder)
    return str(builder.data_dir)
  root = builder.data_dir_root
  if missing := missing_prepare_modules():
    raise DataNotReadyError(
        f"Preparing {title(name)} needs TensorFlow (missing: {', '.join(missing)}): run "
        f"{PREPARE_INSTALL} then {_prepare_command(name, root, manual_dir)}, or prepare it "
        f"on a machine with TensorFlow and copy {root}/{name} here") from None
  sources = _sources(tfds, builder)
  _probe_download(name, root, manual_dir, sources)
  # file_format on the builder (not tfds' tfrecord default): data_source only
  # reads random-access formats. Also skips tfds' GCS mirror, which is tfrecord.
  builder = _builder(tfds, name, data_dir, file_format="array_record")
  config = tfds.download.DownloadConfig(manual_dir=manual_dir)
  try:
    builder.download_and_prepare(download_config=config)
  except Exception as e:  # network, checksum, disk: all end in the same advice
    cause = (str(e).strip().splitlines() or [""])[0][:200]
    raise DataNotReadyError(
        f"Could not prepare {title(name)} in {root} ({type(e).__name__}: {cause}); "
        f"{_manual_hint(sources, manual_dir)}, then run "
        f"{_prepare_command(name, root, manual_dir)}") from e
  return str(builder.data_dir)


def _features(tfds, name: str, builder, label: str):
  """(image key, label key, fine label key or None) of an image-classification data set.

  The label is `label` ("": the data set's own, its supervised label, else "label"),
  a class-label feature or an alias of one. When another label than the data set's
  own is chosen, its own is the fine label.
  """
  info = builder.info
  features = info.features
  supervised = info.supervised_keys if isinstance(info.supervised_keys, tuple) else ()
  images = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
  labels = [k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)]
  if not images or not labels:
    fields.fail("data.name", f"{name} is not an image-classification data set: its features "
                f"{', '.join(features)} lack an image or a class label")
  image = next(k for k in (*supervised[:1], "image", *images) if k in images)
  default = next((k for k in (*supervised[1:2], "label") if k in labels), None)
  aliases = LABEL_ALIASES.get(name.split("/")[0].split(":")[0], {})
  key = aliases.get(label, label) or default
  if key not in labels:
    allowed = ", ".join([*labels, *aliases])
    fields.fail("data.label", f"{name} has no class label {label or 'by default'!r}; allowed: "
                f"{allowed}" + (f", or \"\" for {default}" if default else ""))
  if features[image].np_dtype != np.uint8:
    fields.fail("data.name", f"{name}'s images are {np.dtype(features[image].np_dtype)}; "
                "only 8-bit images are supported")
  return image, key, default if default not in (None, key) else None


def _read_split(source, image_key, label_keys, shape, image_size):
  """All examples of one data source -> uint8 (N, H, W, C), {key: int32 (N,)}."""
  from PIL import Image
  n = len(source)
  channels = shape[-1]
  images = np.empty((n, *shape), np.uint8)
  labels = {k: np.empty((n,), np.int32) for k in label_keys}
  for start in range(0, n, READ_BATCH):
    keys = list(range(start, min(start + READ_BATCH, n)))
    for i, example in zip(keys, source.__getitems__(keys)):
      # Encoded bytes (decoding skipped in tfds): one PIL call, without tfds' per-
      # feature decode overhead (~25% of the read time).
      images[i] = datasets.image_array(Image.open(io.BytesIO(example[image_key])), image_size,
                                       channels)
      for k in label_keys:
        labels[k][i] = example[k]
  return images, labels


def _refines(fine: np.ndarray, coarse: np.ndarray) -> bool:
  """Every fine class lies in one coarse class."""
  pairs = np.unique(np.stack([fine, coarse], 1), axis=0)
  return len(pairs) == len(np.unique(pairs[:, 0]))


def read(data_config) -> datasets.Dataset:
  """The train and test splits of the TFDS data set `data_config.name`.

  Uses data_config.data_dir (None: tfds default), .prepare (prepare if missing),
  .manual_dir (the downloaded archives, for offline preparing), .label (which class
  label) and .image_size (resize on loading; 0: keep, needs one stored size).
  """
  name, data_dir, manual_dir = data_config.name, data_config.data_dir, data_config.manual_dir
  tfds = _import_tfds(name)
  # The builder (not tfds.data_source) so we can check and prepare first:
  # data_source would fail with a bare KeyError on missing data.
  builder = _builder(tfds, name, data_dir)
  _features(tfds, name, builder, data_config.label)  # a bad label fails before preparing
  if not _is_prepared(builder):
    if not data_config.prepare:
      raise DataNotReadyError(
          f"{title(name)} not found at {builder.data_dir}: prepare it once with "
          f"{PREPARE_INSTALL} then {_prepare_command(name, builder.data_dir_root, manual_dir)} "
          f"({_manual_hint(_sources(tfds, builder), manual_dir)}), or set "
          "config.data.prepare=True") from None
    prepare(name, data_dir, manual_dir)
    builder = _builder(tfds, name, data_dir)  # re-reads the written info
  _check_random_access(name, builder)
  info = builder.info
  if not {"train", "test"} <= set(info.splits):
    fields.fail("data.name", f"{name} has splits {', '.join(info.splits)}; a run needs "
                "train and test")
  image_key, label_key, fine_key = _features(tfds, name, builder, data_config.label)
  *size, channels = info.features[image_key].shape
  size = [data_config.image_size] * 2 if data_config.image_size else size
  if None in size:
    fields.fail("data.image_size", f"{name}'s images vary in size; set data.image_size to "
                "the pixels per side to resize them to when loading")
  label_keys = [k for k in (label_key, fine_key) if k]
  skip = tfds.decode.SkipDecoding()
  train, test = builder.as_data_source(
      split=["train", "test"], decoders={k: skip for k in info.features if k not in label_keys})
  shape = (*size, channels or 3)
  # From the metadata, before reading: a data set too large for the memory is one line,
  # not numpy's allocation error (the labels: one or two int32 per example).
  datasets.check_fits(datasets.planned_nbytes(
      sum(info.splits[s].num_examples for s in ("train", "test")), shape, len(label_keys)))
  train_images, train_labels = _read_split(train, image_key, label_keys, shape,
                                           data_config.image_size)
  test_images, test_labels = _read_split(test, image_key, label_keys, shape,
                                         data_config.image_size)
  fine = {}
  if fine_key and _refines(np.concatenate([train_labels[fine_key], test_labels[fine_key]]),
                           np.concatenate([train_labels[label_key], test_labels[label_key]])):
    fine = dict(train_fine_labels=train_labels[fine_key], test_fine_labels=test_labels[fine_key],
                fine_class_names=tuple(info.features[fine_key].names))
  names = tuple(info.features[label_key].names)
  return datasets.Dataset(train_images, train_labels[label_key], test_images,
                          test_labels[label_key], num_classes=len(names), pixel_max=255.0,
                          class_names=names, **fine)


def write_fake(name: str, data_dir: str, num_train: int, num_test: int, *, seed: int = 0,
               class_names: dict[str, tuple[str, ...]] | None = None,
               image_shape: tuple[int, int, int] = (32, 32, 3)) -> str:
  """Writes a small random TFDS data set `name` in tfds' array_record layout, without TF.

  For tests and offline smoke runs: `read` reads it exactly like the real data. The
  features are the builder's own; the first class label cycles through its classes
  (shuffled), every other one is the first modulo its class count, so it groups the
  first's classes as CIFAR-100's coarse labels group its fine ones. `class_names`:
  {label feature: names} (default: the builder's, "0", "1", ... before preparing);
  `image_shape`: for the sizes the metadata leaves open. Returns the variant folder.
  """
  from PIL import Image
  tfds = _import_tfds(name)
  builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  builder.data_path.mkdir(parents=True, exist_ok=True)
  info = builder.info
  for key, names in (class_names or {}).items():
    info.features[key].names = list(names)
  rng = np.random.default_rng(seed)
  kinds = {k: type(f).__name__ for k, f in info.features.items()}
  labels = [k for k, kind in kinds.items() if kind == "ClassLabel"]

  def png(image):
    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="png")
    return buf.getvalue()  # encoded bytes: tfds' own encoder would need TF

  def examples(split, n):
    first = rng.permutation(np.arange(n) % info.features[labels[0]].num_classes)
    out = []
    for i in range(n):
      example = {}
      for k, kind in kinds.items():
        if kind == "Image":
          shape = [s or d for s, d in zip(info.features[k].shape, image_shape)]
          example[k] = png(rng.integers(0, 256, shape, dtype=np.uint8))
        elif kind == "ClassLabel":
          example[k] = int(first[i] % info.features[k].num_classes)
        elif kind == "Text":
          example[k] = f"{split}_{i:05d}"
        else:
          raise NotImplementedError(f"write_fake: feature {k} of type {kind}")
      out.append(example)
    return out

  writer = tfds.core.SequentialWriter(info, max_examples_per_shard=max(num_train, num_test, 1),
                                      file_format="array_record")
  writer.initialize_splits(["train", "test"])
  writer.add_examples({"train": examples("train", num_train), "test": examples("test", num_test)})
  writer.close_all()
  return str(builder.data_dir)


def write_fake_cifar10(data_dir: str, num_train: int, num_test: int, seed: int = 0) -> str:
  """`write_fake` of CIFAR-10 with its class names: every class in each split's labels."""
  return write_fake("cifar10", data_dir, num_train, num_test, seed=seed,
                    class_names={"label": CLASS_NAMES})


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m jaxunlearn.tfds_data",
      description="Prepare a TFDS data set once as array_record files (needs TensorFlow).")
  parser.add_argument("--name", default="cifar10",
                      help="TFDS name: cifar10 (default), cifar100, svhn_cropped, mnist, ...")
  parser.add_argument("--data_dir", default=None, help="tfds data_dir (default: tfds default)")
  parser.add_argument("--manual_dir", default=None,
                      help="folder holding the data set's hand-downloaded archives (offline)")
  args = parser.parse_args(argv)
  try:
    print(f"{title(args.name)} ready at {prepare(args.name, args.data_dir, args.manual_dir)}")
  except (DataNotReadyError, ValueError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  main()
