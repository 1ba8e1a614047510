"""Bad input found by an audit: each is one line before any work, never a traceback or an OOM.

Data: tiny image folders (PNGs written by Pillow, 16-bit ones by hand with zlib), fake
TFDS data sets (`tfds_data.write_fake`), scikit-learn's digits and small arrays, all
made here. The memory guards are tested against a host memory the test sets; the
command line is run for real (in parallel, once per module) to see its stderr and status.
"""
import os
import struct
import subprocess
import sys
import zlib

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from jaxunlearn import config as config_lib, datasets, evaluate, image_folder, models, privacy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "configs", "digits.py")


def _one_line(fn, *args, error=ValueError, **kwargs) -> str:
  with pytest.raises(error) as info:
    fn(*args, **kwargs)
  message = str(info.value)
  assert message and "\n" not in message, message
  return message


def _data_config(**fields):
  c = config_lib.get_base_config().data
  c.update(fields)
  return c


def _write_folder(root, split_classes, size=(4, 3), mode="RGB", seed=0):
  """root/<split>/<class>/<i>.png, random pixels; {split: {class: count}}."""
  r = np.random.default_rng(seed)
  for split, classes in split_classes.items():
    for name, count in classes.items():
      (root / split / name).mkdir(parents=True, exist_ok=True)
      for i in range(count):
        shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
        Image.fromarray(r.integers(0, 256, shape, dtype=np.uint8), mode).save(
            root / split / name / f"{i}.png")
  return root


def _png16(path, array_HxWxC: np.ndarray) -> None:
  """A 16-bit greyscale or RGB PNG, written by hand (zlib, struct), not by Pillow."""
  H, W, C = array_HxWxC.shape
  rows = array_HxWxC.astype(">u2").reshape(H, W * C)
  raw = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter type 0 per row

  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
  header = struct.pack(">IIBBBBB", W, H, 16, {1: 0, 3: 2}[C], 0, 0, 0)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                   + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _small_host(monkeypatch, nbytes=2 ** 20):
  """CPU devices share the host's memory: pretend it has `nbytes` available."""
  monkeypatch.setattr(datasets, "host_memory", lambda: nbytes)


def _never(*args, **kwargs):
  raise AssertionError("decoded although the size check should have refused first")


# ---- 1. memory: checked from file counts and metadata, before reading ----

def test_folder_too_large_is_refused_before_decoding(tmp_path, monkeypatch):
  _write_folder(tmp_path, {"train": {"a": 2, "b": 2}, "test": {"a": 1}})
  _small_host(monkeypatch)
  monkeypatch.setattr(datasets, "image_array", _never)
  message = _one_line(datasets.load, _data_config(name="folder", folder=str(tmp_path),
                                                  image_size=20000))
  # 5 images of 20000 x 20000 x 3 uint8 and their labels.
  need = datasets.size_text(5 * (20000 * 20000 * 3 + 4))
  assert message.startswith(f"The data set does not fit: its images and labels take {need}")
  assert "the host has 1.00 MiB available" in message and "data.image_size" in message


def test_folder_that_fits_is_read(tmp_path, monkeypatch):
  _write_folder(tmp_path, {"train": {"a": 2, "b": 2}, "test": {"a": 1}})
  _small_host(monkeypatch, 2 ** 30)
  d = datasets.load(_data_config(name="folder", folder=str(tmp_path), image_size=5))
  assert d.train_images.shape == (4, 5, 5, 3)


def test_tfds_too_large_is_refused_from_its_metadata(tmp_path, monkeypatch):
  pytest.importorskip("tensorflow_datasets")
  from jaxunlearn import tfds_data
  tfds_data.write_fake("mnist", str(tmp_path), num_train=6, num_test=3)
  _small_host(monkeypatch)
  monkeypatch.setattr(tfds_data, "_read_split", _never)
  config = _data_config(name="mnist", data_dir=str(tmp_path))
  # As stored, 9 examples of 28 x 28 x 1 (the metadata's shape) fit in 1 MiB: read on.
  with pytest.raises(AssertionError, match="decoded although"):
    datasets.load(config)
  config.image_size = 4000  # resized when loading: 9 x 4000 x 4000 x 1
  message = _one_line(datasets.load, config)
  need = datasets.size_text(9 * (4000 * 4000 + 4))
  assert message.startswith(f"The data set does not fit: its images and labels take {need}")


def test_resnet_input_follows_data_image_size_for_unread_data():
  """For a data set known only once read, the model's side is data.image_size (not 32)."""
  from jaxunlearn import sizes
  c = config_lib.get_base_config()
  c.data.name, c.model.name = "folder", "resnet18"
  small = sizes.example_bytes(c, training=True)
  c.data.image_size = 256
  assert sizes.example_bytes(c, training=True) > 50 * small


# ---- 2. image folders: 16-bit, damaged files, missing classes ----

def test_16_bit_greyscale_is_scaled_by_its_depth(tmp_path):
  values = np.array([[0, 255, 256, 1000], [30000, 40000, 65280, 65535]], np.uint16)
  _png16(tmp_path / "train" / "a" / "0.png", values[..., None])
  _png16(tmp_path / "test" / "a" / "0.png", values[::-1, :, None])
  d = datasets.load(_data_config(name="folder", folder=str(tmp_path)))
  assert d.train_images.shape == (1, 2, 4, 1)  # one grey channel, as 8-bit grey is
  expected = np.rint(values.astype(np.float64) * 255 / 65535).astype(np.uint8)
  np.testing.assert_array_equal(d.train_images[0, ..., 0], expected)
  np.testing.assert_array_equal(d.test_images[0, ..., 0], expected[::-1])


def test_16_bit_rgb_is_scaled_by_its_depth(tmp_path):
  r = np.random.default_rng(0)
  values = r.integers(0, 65536, (3, 5, 3)).astype(np.uint16)
  _png16(tmp_path / "train" / "a" / "0.png", values)
  _png16(tmp_path / "test" / "a" / "0.png", values)
  d = datasets.load(_data_config(name="folder", folder=str(tmp_path)))
  # Pillow keeps the high byte of each 16-bit value: within 1 of the exact scaling.
  exact = values.astype(np.float64) * 255 / 65535
  assert np.abs(d.train_images[0].astype(np.float64) - exact).max() <= 1


def test_32_bit_images_are_refused_naming_the_file(tmp_path):
  _write_folder(tmp_path, {"train": {"a": 1}, "test": {"a": 1}})
  path = tmp_path / "train" / "a" / "deep.tif"
  Image.fromarray(np.full((3, 4), 70000, np.int32)).save(path)
  message = _one_line(datasets.load, _data_config(name="folder", folder=str(tmp_path)))
  assert message.startswith(f"config.data.folder: {path} has 'I' pixels"), message
  assert "save it with 8 or 16 bits per channel" in message


def test_truncated_image_names_the_file(tmp_path):
  _write_folder(tmp_path, {"train": {"a": 2}, "test": {"a": 1}}, size=(32, 32))
  path = tmp_path / "train" / "a" / "1.png"
  path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])  # the header stays whole
  message = _one_line(datasets.load, _data_config(name="folder", folder=str(tmp_path)))
  assert message.startswith(f"config.data.folder: cannot decode image {path}: "), message
  assert message.endswith("replace or remove the file")


@pytest.mark.parametrize("case, start", [
    ("empty train class", "config.data.folder: class 'b' has no images in {root}/train/b"),
    ("test class not in train",
     "config.data.folder: test class 'c' ({root}/test/c) is not in {root}/train"),
])
def test_missing_classes_are_one_line(tmp_path, case, start):
  _write_folder(tmp_path, {"train": {"a": 1}, "test": {"a": 1}})
  (tmp_path / ("train/b" if case == "empty train class" else "test/c")).mkdir()
  if case == "test class not in train":
    _write_folder(tmp_path, {"test": {"c": 1}}, seed=1)
  message = _one_line(datasets.load, _data_config(name="folder", folder=str(tmp_path)))
  assert message.startswith(start.format(root=tmp_path)), message


def test_a_class_without_test_images_loads(tmp_path):
  """An empty test/<class>/ is allowed: the class has no test examples (see the metrics below)."""
  _write_folder(tmp_path, {"train": {"a": 2, "b": 2}, "test": {"a": 1}})
  (tmp_path / "test" / "b").mkdir()
  d = datasets.load(_data_config(name="folder", folder=str(tmp_path)))
  assert d.class_names == ("a", "b") and d.test_labels.tolist() == [0]


# ---- 3. a training batch larger than the training set ----

def _digits_run(**fields):
  c = config_lib.get_base_config()
  c.data.name = "digits"
  for k, v in fields.items():
    section, _, key = k.rpartition(".")
    (c[section] if section else c)[key] = v
  return c


@pytest.fixture(scope="module")
def digits():
  return datasets.load_digits(0.25, 0)


@pytest.mark.parametrize("fields, start", [
    ({"batch_size": 2000}, "config.batch_size: 2,000 is larger than the training set "
                           "(1,347 examples); set it to at most 1,347"),
    ({"methods": "scrub", "scrub.forget_batch_size": 1348},
     "config.scrub.forget_batch_size: 1,348 is larger than the training set"),
    ({"train.batch_size": 5000}, "config.train.batch_size: 5,000 is larger"),
])
def test_batch_larger_than_the_training_set_is_refused(digits, fields, start):
  message = _one_line(datasets.check_config, _digits_run(**fields), digits)
  assert message.startswith(start), message


def test_batches_that_fit_or_belong_to_unused_methods_pass(digits):
  # 1,347 is the whole training set; SCRUB's batch is not read unless SCRUB runs.
  datasets.check_config(_digits_run(**{"batch_size": 1347, "methods": "finetune",
                                       "scrub.forget_batch_size": 99999}), digits)


# ---- 4. own arrays and own models from Python ----

def _arrays(n=12, m=6, classes=3):
  r = np.random.default_rng(0)
  return dict(train_images=r.integers(0, 256, (n, 6, 6, 1), dtype=np.uint8),
              train_labels=(np.arange(n) % classes).astype(np.int32),
              test_images=r.integers(0, 256, (m, 6, 6, 1), dtype=np.uint8),
              test_labels=(np.arange(m) % classes).astype(np.int32),
              num_classes=classes, pixel_max=255.0, class_names=("a", "b", "c"))


@pytest.mark.parametrize("change, start", [
    (dict(train_labels=[0, 1, 2] * 4), "train labels must be an integer numpy array, got a list"),
    (dict(test_labels=np.array([0, 1, 2, 3, 0, 1], np.int32)),
     "test labels hold 3, outside 0..2 for 3 classes"),
    (dict(train_labels=np.r_[-1, np.arange(11) % 3].astype(np.int32)),
     "train labels hold -1, outside 0..2"),
    (dict(train_labels=np.zeros(12, np.float32)), "train labels must be an integer numpy array"),
    (dict(train_labels=np.zeros((12, 1), np.int32)), "train labels (12, 1) do not match"),
    (dict(train_images=np.zeros((12, 6, 6), np.uint8)),
     "train images must be a uint8 numpy array (N, H, W, C), got uint8 (12, 6, 6); greyscale"),
    (dict(test_images=np.zeros((6, 6, 6, 1), np.float32)), "test images must be a uint8"),
    (dict(train_images=np.zeros((0, 6, 6, 1), np.uint8), train_labels=np.zeros(0, np.int32)),
     "train images (0, 6, 6, 1) hold no pixels"),
    (dict(pixel_max=0), "pixel_max (a white pixel's value"),
])
def test_own_arrays_are_checked_in_one_line(change, start):
  message = _one_line(datasets.Dataset, **{**_arrays(), **change})
  assert message.startswith(start), message


def test_own_arrays_accept_any_integer_labels():
  d = datasets.Dataset(**{**_arrays(), "train_labels": np.arange(12) % 3})  # int64
  assert d.train_labels.dtype == np.int64


class _MLP(nn.Module):
  num_classes: int = 3
  logits_only: bool = False

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(8)(x.reshape(x.shape[0], -1)))
    logits = nn.Dense(self.num_classes)(h)
    return logits if self.logits_only else (logits, h)


class _WithBatchNorm(nn.Module):
  @nn.compact
  def __call__(self, x, train, mask=None):
    h = nn.BatchNorm(use_running_average=not train)(x.reshape(x.shape[0], -1))
    return nn.Dense(3)(h), h


def _init(model, shape=(1, 6, 6, 1)):
  return model.init(jax.random.key(0), shape)


@pytest.mark.parametrize("module, start", [
    (_MLP(num_classes=5), "model's logits are (2, 5) for a batch of 2, but the data set has "
                          "3 classes; give its head 3 outputs"),
    (_MLP(logits_only=True), "model must return (logits, features), got (2, 3)"),
])
def test_own_model_outputs_are_checked_in_one_line(module, start):
  model = models.Model(module)
  message = _one_line(models.check_outputs, model, _init(model), (6, 6, 1), 3)
  assert message.startswith(start), message


def test_own_model_that_cannot_take_the_images_is_one_line():
  model = models.Model(_MLP())
  variables = _init(model, (1, 4, 4, 1))  # for 4x4 images, given 6x6 ones
  message = _one_line(models.check_outputs, model, variables, (6, 6, 1), 3)
  assert message.startswith("model: applying it to images of shape (2, 6, 6, 1) failed"), message


def test_good_models_pass_the_output_check():
  for model in (models.Model(_MLP()), models.Model(_WithBatchNorm(), stateful=True)):
    models.check_outputs(model, _init(model), (6, 6, 1), 3)
  c = config_lib.get_base_config()  # the registry's own: the ViT, resized to its side
  c.model.vit.update(image_size=8, patch_size=4, hidden_size=16, depth=1, num_heads=2,
                     mlp_dim=16)
  model, variables = models.build(c, 10, (8, 8, 1), jax.random.key(0))
  models.check_outputs(model, variables, (5, 5, 1), 10)


# ---- 5. privacy metrics follow the scenario's kind ----

def _outputs(N=60, M=24, C=3, D=4, seed=0):
  r = np.random.default_rng(seed)
  ytr, yte = np.arange(N) % C, np.arange(M) % C
  ptr, pte = r.dirichlet(np.ones(C), N), r.dirichlet(np.ones(C), M)
  ftr = r.normal(size=(N, D)) + ytr[:, None]
  fte = r.normal(size=(M, D)) + yte[:, None]
  losses = dict(train_loss_N=-np.log(ptr[np.arange(N), ytr]),
                test_loss_M=-np.log(pte[np.arange(M), yte]))
  return ytr, yte, ptr, pte, ftr, fte, losses


def _svc_efficacy(member, nonmember, target):
  """MIA-efficacy written out with scikit-learn's SVC (Unlearn-Sparse's attack)."""
  from sklearn.svm import SVC
  x = np.r_[member, nonmember][:, None]
  y = np.r_[np.ones(len(member)), np.zeros(len(nonmember))]
  clf = SVC(C=3, gamma="auto", kernel="rbf").fit(x, y)
  return 100 * np.mean(clf.predict(np.asarray(target)[:, None]) == 0)


def test_class_wise_without_forget_test_examples_omits_rather_than_switches():
  ytr, yte, ptr, pte, ftr, fte, losses = _outputs()
  # Class 2 forgotten, but the test set holds none of it (a folder's empty test/<class>/).
  keep = yte != 2
  yte, pte, fte = yte[keep], pte[keep], fte[keep]
  losses["test_loss_M"] = losses["test_loss_M"][keep]
  forget_train, forget_test = ytr == 2, np.zeros(len(yte), bool)
  args = (forget_train, forget_test, ptr, ytr, pte, yte, ftr, fte)
  out = evaluate.privacy_metrics(*args, **losses, seed=0, class_wise=True)
  # The probe and loss-MIA are scored on the forgotten classes' test examples: none here.
  assert set(out) == {"mia_efficacy"}
  conf_tr, conf_te = ptr[np.arange(len(ytr)), ytr], pte[np.arange(len(yte)), yte]
  nonmember = conf_te  # the test set without the forgotten class: all of it
  member = conf_tr[~forget_train][:len(nonmember)]
  assert out["mia_efficacy"] == pytest.approx(
      _svc_efficacy(member, nonmember, conf_tr[forget_train]))
  # Left to guess (the default), the same run gets the random-subset definitions.
  guessed = evaluate.privacy_metrics(*args, **losses, seed=0)
  assert {"probe_forget_acc", "loss_mia"} <= set(guessed)


def test_class_wise_flag_keeps_the_definitions_when_test_examples_exist():
  ytr, yte, ptr, pte, ftr, fte, losses = _outputs()
  args = (ytr == 1, yte == 1, ptr, ytr, pte, yte, ftr, fte)
  flagged = evaluate.privacy_metrics(*args, **losses, seed=0, class_wise=True)
  assert flagged == evaluate.privacy_metrics(*args, **losses, seed=0)
  # The probe: fit on every training example, scored on class 1's test examples.
  assert flagged["probe_forget_acc"] == pytest.approx(privacy.linear_probe_accuracy(
      ftr, ytr, fte[yte == 1], yte[yte == 1]))


def test_random_subset_flag_uses_the_random_definitions():
  ytr, yte, ptr, pte, ftr, fte, losses = _outputs()
  forget = np.zeros(len(ytr), bool)
  forget[::6] = True
  out = evaluate.privacy_metrics(forget, np.zeros(len(yte), bool), ptr, ytr, pte, yte, ftr, fte,
                                 **losses, seed=0, class_wise=False)
  assert out["probe_forget_acc"] == pytest.approx(privacy.linear_probe_accuracy(
      ftr[~forget], ytr[~forget], ftr[forget], ytr[forget]))
  assert (out["loss_mia"], out["indiscernibility"]) == pytest.approx(privacy.loss_mia(
      losses["train_loss_N"][forget], losses["test_loss_M"], seed=0))


# ---- 6. TFDS names tfds does not have ----

@pytest.mark.parametrize("name, start, has", [
    ("no_such_ds", "config.data.name: unknown data set 'no_such_ds': neither digits, synthetic, "
                   "folder nor a TFDS data set; TFDS' image-classification data sets are listed at",
     "python -m jaxunlearn.tfds_data --name NAME --data_dir DIR"),
    ("cifar1000", "config.data.name: unknown data set 'cifar1000'", "closest: cifar100"),
    ("mnist:9.9.9", "config.data.name: 'mnist:9.9.9': Dataset mnist cannot be loaded at version "
                    "9.9.9, only: 3.0.1.", "set it to 'mnist'"),
    ("mnist/foo", "config.data.name: 'mnist/foo': BuilderConfig foo not found with version",
     "mnist has no builder configs"),
    ("cifar10_corrupted/foo", "config.data.name: 'cifar10_corrupted/foo': BuilderConfig foo",
     "set it to one of cifar10_corrupted/brightness_1,"),
])
def test_tfds_names_it_lacks_are_one_line(tmp_path, name, start, has):
  pytest.importorskip("tensorflow_datasets")
  message = _one_line(datasets.load, _data_config(name=name, data_dir=str(tmp_path)))
  assert message.startswith(start) and has in message, message


# ---- the command line: one `error:` line, status 2, no workdir ----

def _many_images(root) -> str:
  """A folder whose images, at data.image_size 20000, outgrow this host's memory."""
  n = datasets.host_memory() // (20000 * 20000 * 3) + 2
  _write_folder(root, {"train": {"a": n - 1}, "test": {"a": 1}}, size=(2, 2))
  return str(root)


CLI_CASES = {
    "folder too large": (lambda tmp: ["--config.data.name=folder", f"--config.data.folder="
                                      f"{_many_images(tmp / 'images')}",
                                      "--config.data.image_size=20000"],
                         "error: The data set does not fit"),
    "batch too large": (lambda tmp: ["--config.batch_size=5000"],
                        "error: config.batch_size: 5,000 is larger than the training set"),
    "unknown tfds name": (lambda tmp: ["--config.data.name=no_such_ds",
                                       f"--config.data.data_dir={tmp}"],
                          "error: config.data.name: unknown data set 'no_such_ds'"),
    "tfds version": (lambda tmp: ["--config.data.name=mnist:9.9.9",
                                  f"--config.data.data_dir={tmp}"],
                     "error: config.data.name: 'mnist:9.9.9': Dataset mnist cannot be loaded"),
    # tfds' own warning of the missing variant folder stays out: the line says it.
    "tfds not prepared": (lambda tmp: ["--config.data.name=cifar10:3.0.2",
                                       f"--config.data.data_dir={tmp}"],
                          "error: cifar10:3.0.2 not found at"),
}


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
  procs = {}
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
  for name, (args, _) in CLI_CASES.items():
    tmp = tmp_path_factory.mktemp(name.replace(" ", "_"))
    workdir = tmp / "workdir"
    procs[name] = workdir, subprocess.Popen(
        [sys.executable, "-m", "jaxunlearn.main", "--config", DIGITS, "--workdir", str(workdir),
         *args(tmp)], cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)
  out = {}
  for name, (workdir, p) in procs.items():
    _, stderr = p.communicate(timeout=300)
    out[name] = workdir, p.returncode, stderr
  return out


@pytest.mark.parametrize("name", CLI_CASES)
def test_cli_refuses_in_one_line_before_any_work(cli_runs, name):
  workdir, returncode, stderr = cli_runs[name]
  assert returncode == 2, stderr
  assert len(stderr.strip().splitlines()) == 1, stderr
  assert stderr.startswith(CLI_CASES[name][1]), stderr
  assert not workdir.exists()
