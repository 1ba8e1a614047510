"""Data sources and the data checks: image folders, resizing, normalisation fields,
the checks that need the loaded data, and the refusal of a data set too large.

Image folders are tiny PNGs written with Pillow into tmp_path; PNG is lossless, so
the loaded pixels must be the written ones. TFDS data sets: tests/test_tfds_data.py.
"""
import types

import numpy as np
import pytest
from PIL import Image

from jaxunlearn import config as config_lib, datasets


def _data_config(**fields):
  c = config_lib.get_base_config().data
  c.update(fields)
  return c


def _error(fn, *args, error=ValueError) -> str:
  with pytest.raises(error) as info:
    fn(*args)
  message = str(info.value)
  assert "\n" not in message
  return message


def _write_folder(root, split_classes, size=(6, 5), mode="RGB", seed=0):
  """root/<split>/<class>/<i>.png with random pixels; returns {path: array written}."""
  rng = np.random.default_rng(seed)
  written = {}
  for split, classes in split_classes.items():
    for name, count in classes.items():
      folder = root / split / name
      folder.mkdir(parents=True)
      for i in range(count):
        w, h = size
        shape = (h, w) if mode == "L" else (h, w, 3)
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        path = folder / f"{i}.png"
        Image.fromarray(pixels, mode).save(path)
        written[str(path)] = pixels
  return written


def test_image_folder_labels_from_sorted_folder_names(tmp_path):
  written = _write_folder(tmp_path, {"train": {"zebra": 2, "cat": 3, "dog": 1},
                                     "test": {"dog": 2, "cat": 1}})
  (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")  # skipped
  (tmp_path / "train" / ".DS_Store").write_text("")
  d = datasets.load(_data_config(name="folder", folder=str(tmp_path)))
  assert d.class_names == ("cat", "dog", "zebra") and d.num_classes == 3 and d.pixel_max == 255
  assert d.train_images.shape == (6, 5, 6, 3) and d.test_images.shape == (3, 5, 6, 3)
  for split, classes in (("train", ("cat",) * 3 + ("dog",) + ("zebra",) * 2),
                         ("test", ("cat",) + ("dog",) * 2)):
    expected = [written[str(tmp_path / split / c / f"{i}.png")]
                for c in dict.fromkeys(classes) for i in range(classes.count(c))]
    np.testing.assert_array_equal(getattr(d, f"{split}_images"), np.stack(expected))
    assert [d.class_names[k] for k in getattr(d, f"{split}_labels")] == list(classes)
    assert getattr(d, f"{split}_labels").dtype == np.int32


def test_greyscale_folder_has_one_channel(tmp_path):
  written = _write_folder(tmp_path, {"train": {"a": 1, "b": 1}, "test": {"a": 1}}, mode="L")
  d = datasets.load(_data_config(name="folder", folder=str(tmp_path)))
  assert d.train_images.shape == (2, 5, 6, 1)
  np.testing.assert_array_equal(d.test_images[0, ..., 0], written[str(tmp_path / "test/a/0.png")])


def test_folder_resizes_mixed_sizes_to_image_size(tmp_path):
  """image_size: each image as torchvision's Resize on a PIL image (bilinear)."""
  _write_folder(tmp_path, {"train": {"a": 2}, "test": {"a": 1}}, size=(9, 7))
  _write_folder(tmp_path / "more", {"train": {"a": 1}, "test": {}}, size=(3, 4), seed=1)
  (tmp_path / "more/train/a/0.png").rename(tmp_path / "train/a/2.png")
  d = datasets.load(_data_config(name="folder", folder=str(tmp_path), image_size=4))
  assert d.train_images.shape == (3, 4, 4, 3)
  for i in range(3):
    with Image.open(tmp_path / f"train/a/{i}.png") as image:
      reference = np.asarray(image.convert("RGB").resize((4, 4), Image.BILINEAR))
    np.testing.assert_array_equal(d.train_images[i], reference)


@pytest.mark.parametrize("case, start", [
    ("missing", "config.data.folder: {root}/train is not a folder; the layout is"),
    ("no_images", "config.data.folder: no images in {root}/train/<class>/"),
    ("empty_class", "config.data.folder: class 'b' has no images in {root}/train/b"),
    ("test_only_class",
     "config.data.folder: test class 'c' ({root}/test/c) is not in {root}/train"),
    ("mixed_sizes", "config.data.image_size: the images differ in size ({root}/train/a/0.png: 6x5"),
    ("not_an_image", "config.data.folder: cannot read image {root}/train/a/1.png"),
])
def test_folder_errors_are_one_line(tmp_path, case, start):
  root = tmp_path / "images"
  if case == "no_images":
    (root / "train" / "a").mkdir(parents=True)
    (root / "test" / "a").mkdir(parents=True)
  elif case == "empty_class":
    _write_folder(root, {"train": {"a": 1}, "test": {"a": 1}})
    (root / "train" / "b").mkdir()
  elif case == "test_only_class":
    _write_folder(root, {"train": {"a": 1}, "test": {"a": 1, "c": 1}})
  elif case == "mixed_sizes":
    _write_folder(root, {"train": {"a": 1}, "test": {"a": 1}})
    Image.new("RGB", (3, 3)).save(root / "test" / "a" / "1.png")
  elif case == "not_an_image":
    _write_folder(root, {"train": {"a": 1}, "test": {"a": 1}})
    (root / "train" / "a" / "1.png").write_bytes(b"not a png")
  message = _error(datasets.load, _data_config(name="folder", folder=str(root)))
  assert message.startswith(start.format(root=root)), message


def test_digits_resized_and_one_label():
  from sklearn.datasets import load_digits
  d = datasets.load(_data_config(image_size=16))
  assert d.train_images.shape[1:] == (16, 16, 1) and d.pixel_max == 16
  plain = datasets.load(_data_config())
  reference = np.asarray(
      Image.fromarray(plain.train_images[0, ..., 0]).resize((16, 16), Image.BILINEAR))
  np.testing.assert_array_equal(d.train_images[0, ..., 0], reference)
  assert len(d.train_images) + len(d.test_images) == len(load_digits().target)
  message = _error(datasets.load, _data_config(label="fine"))
  assert message.startswith('config.data.label: digits has one set of labels; set data.label to ""')


def test_digits_coarse_pairs_digits():
  fine = datasets.load(_data_config())
  d = datasets.load(_data_config(label="coarse"))
  assert d.num_classes == 5 and d.class_names == ("0-1", "2-3", "4-5", "6-7", "8-9")
  np.testing.assert_array_equal(d.train_fine_labels, fine.train_labels)
  np.testing.assert_array_equal(d.test_fine_labels, fine.test_labels)
  np.testing.assert_array_equal(d.train_labels, fine.train_labels // 2)
  np.testing.assert_array_equal(d.test_images, fine.test_images)
  assert d.fine_class_names == tuple("0123456789")


@pytest.mark.parametrize("mean, std, channels, expected", [
    ("0.5", "0.5", 3, ((0.5,) * 3, (0.5,) * 3)),
    ("0.4914,0.4822,0.4465", "0.2470, 0.2435, 0.2616", 3,
     ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))),
    ("0.1307", "0.3081", 1, ((0.1307,), (0.3081,))),
    ("-1", "2", 4, ((-1.0,) * 4, (2.0,) * 4)),
    ("0.4914,0.4822,0.4465", "0.5", None, ((0.4914, 0.4822, 0.4465), (0.5,))),
])
def test_normalization_parsing(mean, std, channels, expected):
  assert datasets.normalization(_data_config(mean=mean, std=std), channels) == expected


@pytest.mark.parametrize("field, value, channels, start", [
    ("mean", "", None, "config.data.mean: must be one number or one per channel"),
    ("mean", "0.5,,0.5", None, "config.data.mean: must be one number or one per channel"),
    ("std", "nan", None, "config.data.std: must be one number or one per channel"),
    ("mean", "red", None, "config.data.mean: must be one number or one per channel"),
    ("std", "0", None, "config.data.std: must be > 0"),
    ("std", "0.2,-0.1,0.2", None, "config.data.std: must be > 0"),
    ("mean", "0.5,0.5", 3, "config.data.mean: has 2 entries but the images have 3 channel(s); "
     "give 1 or 3"),
    ("std", "0.2,0.2,0.2", 1, "config.data.std: has 3 entries but the images have 1 channel(s)"),
])
def test_normalization_errors_name_the_field(field, value, channels, start):
  message = _error(datasets.normalization, _data_config(**{field: value}), channels)
  assert message.startswith(start), message


def _dataset(n_train=10, n_test=5, shape=(4, 4, 3), classes=3):
  labels = lambda n: (np.arange(n) % classes).astype(np.int32)
  return datasets.Dataset(np.zeros((n_train, *shape), np.uint8), labels(n_train),
                          np.zeros((n_test, *shape), np.uint8), labels(n_test),
                          num_classes=classes, pixel_max=255.0,
                          class_names=tuple(map(str, range(classes))))


def _device(limit, kind="NVIDIA H100 80GB HBM3"):
  stats = None if limit is None else {"bytes_limit": limit}
  return types.SimpleNamespace(memory_stats=lambda: stats, device_kind=kind,
                               platform="cpu" if limit is None else "gpu")


def test_nbytes_counts_images_and_labels():
  d = _dataset()
  assert d.nbytes == 15 * 48 + 15 * 4


def test_a_data_set_too_large_is_refused_in_one_line():
  d = _dataset()  # 780 bytes
  datasets.check_fits(d, [_device(None)], limit_bytes=1000)  # 780 <= 800
  message = _error(datasets.check_fits, d, [_device(None)], 900)  # 780 > 720
  assert message.startswith("The data set does not fit: its images and labels take 780 bytes as "
                            "uint8, kept whole on each of 1 device(s), but the host has 900 bytes "
                            "available (at most 80% of it for data); set a smaller "
                            "data.image_size"), message


def test_fit_uses_the_smallest_accelerator_and_counts_host_copies(monkeypatch):
  d = _dataset(n_train=2 ** 20, shape=(32, 32, 3))  # 3 GiB of images
  gib = 2 ** 30
  datasets.check_fits(d, [_device(80 * gib), _device(80 * gib)])
  message = _error(datasets.check_fits, d, [_device(80 * gib), _device(3 * gib, "Small GPU")])
  assert "3.00 GiB as uint8, kept whole on each of 2 device(s), but Small GPU (gpu) has 3.00 GiB" \
      in message
  # CPU devices hold their copies in the host's memory: 2 copies of 3 GiB need 7.5 GiB.
  monkeypatch.setattr(datasets, "host_memory", lambda: 8 * gib)
  datasets.check_fits(d, [_device(None)] * 2)
  message = _error(datasets.check_fits, d, [_device(None)] * 3)
  assert "kept whole on each of 3 device(s), 3 copies in host memory, but the host has 8.00 GiB" \
      in message


def test_fit_on_this_machine():
  """The real query: jax's devices (on the CPU, the host's available memory)."""
  datasets.check_fits(_dataset())
  assert datasets.host_memory() > 0


def _run_config(**fields):
  c = config_lib.get_base_config()
  for key, value in fields.items():
    section, _, name = key.rpartition(".")
    (c[section] if section else c)[name] = value
  return c


@pytest.mark.parametrize("fields, start", [
    ({"forget_class": "3"}, "config.forget_class: 3 is out of range; allowed: 0..2 for digits"),
    ({"forget_class": "0,1,2"},
     "config.forget_class: forgets every class of digits; leave at least one"),
    ({"data.mean": "0.5,0.5"}, "config.data.mean: has 2 entries but the images have 3 channel(s)"),
])
def test_check_config_needs_the_data(fields, start):
  c = _run_config(**fields)
  config_lib.validate(c)  # valid until the data's classes and channels are known
  message = _error(datasets.check_config, c, _dataset())
  assert message.startswith(start), message


def test_check_config_passes_a_good_config():
  # batch_size 10: the whole training set of `_dataset` (a larger one is refused).
  datasets.check_config(_run_config(forget_class="0,2", batch_size=10,
                                    **{"data.std": "0.2,0.3,0.4"}), _dataset())
  # Scenario "random" may name every class: forget_class is not used.
  datasets.check_config(_run_config(forget_class="0,1,2", scenario="random", batch_size=10),
                        _dataset())


@pytest.mark.parametrize("field, value, start", [
    ("data.name", "CIFAR-10", "config.data.name: 'CIFAR-10' is not a data set name"),
    ("data.name", "", "config.data.name: '' is not a data set name"),
    ("data.label", "coarse label", "config.data.label: must be \"\" (the data set's own label)"),
    ("data.folder", None, "config.data.folder: is not set"),
    ("data.image_size", -1, "config.data.image_size: must be an integer >= 0"),
    ("data.mean", "0.5;0.4", "config.data.mean: must be one number or one per channel"),
    ("data.std", "-0.5", "config.data.std: must be > 0"),
    ("data.augment", "flip", "config.data.augment: unknown value 'flip'; allowed: none, crop_flip"),
    ("forget_class", "-1", "config.forget_class: -1 is out of range"),
])
def test_validate_new_data_fields(field, value, start):
  c = _run_config(**{field: value})
  if field == "data.folder":
    c.data.name = "folder"
  message = _error(config_lib.validate, c)
  assert message.startswith(start), message


@pytest.mark.parametrize("name", ["cifar100", "svhn_cropped", "emnist/balanced", "mnist:3.0.1",
                                  "folder", "digits", "synthetic"])
def test_validate_accepts_any_tfds_name(name):
  c = _run_config(**{"data.name": name, "data.label": "coarse"})
  c.data.folder = "/images" if name == "folder" else None
  config_lib.validate(c)


def test_a_folder_needs_the_folder_source():
  # Set alone, data.folder would be ignored: the run would read digits and say nothing.
  message = _error(config_lib.validate, _run_config(**{"data.folder": "/images"}))
  assert message == ("config.data.folder: is set but data.name is 'digits'; set "
                     "data.name=folder to read the folder, or leave data.folder unset")


@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5])
def test_hold_out_is_a_fraction_below_one(value):
  message = _error(config_lib.validate, _run_config(**{"data.hold_out": value}))
  assert message.startswith("config.data.hold_out: must be a finite number in [0, 1)"), message


def _held(name="digits", **fields):
  c = _run_config(**{"data.name": name, **fields})
  return datasets.load(c.data)


def test_hold_out_leaves_a_stratified_part_of_the_training_set_out():
  full, held = _held(), _held(**{"data.hold_out": 0.1})
  n = len(full.train_labels)
  assert len(held.train_labels) == n - round(0.1 * n)
  # Every class loses its share (sklearn's stratified rounding: within one example).
  lost = np.bincount(full.train_labels, minlength=10) - np.bincount(held.train_labels, minlength=10)
  np.testing.assert_allclose(lost, 0.1 * np.bincount(full.train_labels), atol=1)
  # What is kept stays in the data set's order and is unchanged; the test set is untouched.
  flat = lambda x: x.reshape(len(x), -1)
  rows = {r.tobytes(): i for i, r in enumerate(flat(full.train_images))}
  kept = [rows[r.tobytes()] for r in flat(held.train_images)]
  assert kept == sorted(kept)
  np.testing.assert_array_equal(full.train_labels[kept], held.train_labels)
  np.testing.assert_array_equal(full.test_images, held.test_images)


def test_hold_out_is_seeded_by_split_seed():
  a, b = _held(**{"data.hold_out": 0.2}), _held(**{"data.hold_out": 0.2})
  c = _held(**{"data.hold_out": 0.2, "data.split_seed": 1})
  np.testing.assert_array_equal(a.train_images, b.train_images)
  # split_seed also reshuffles digits' train/test split: compare the counts only.
  assert not np.array_equal(a.train_labels, c.train_labels)


def test_hold_out_keeps_fine_labels_in_proportion():
  full, held = _held(**{"data.label": "coarse"}), _held(**{"data.label": "coarse",
                                                             "data.hold_out": 0.5})
  assert held.train_fine_labels is not None
  assert len(held.train_fine_labels) == len(held.train_labels)
  lost = np.bincount(full.train_fine_labels) - np.bincount(held.train_fine_labels, minlength=10)
  np.testing.assert_allclose(lost, 0.5 * np.bincount(full.train_fine_labels), atol=1)


def test_hold_out_too_small_to_stratify_says_so():
  message = _error(datasets.load, _run_config(**{"data.name": "synthetic",
                                                 "data.synthetic.num_train": 4,
                                                 "data.hold_out": 0.1}).data)
  assert message.startswith("config.data.hold_out: 0.1 of 4 training examples cannot be split "
                            "stratified by class"), message


def test_fine_labels_must_come_together():
  d = _dataset()
  with pytest.raises(ValueError, match="fine labels and fine_class_names must be given together"):
    datasets.Dataset(d.train_images, d.train_labels, d.test_images, d.test_labels, num_classes=3,
                     pixel_max=255.0, class_names=d.class_names, train_fine_labels=d.train_labels)
