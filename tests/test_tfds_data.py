"""TFDS data sets (CIFAR-10, CIFAR-100 fine and coarse, SVHN, MNIST), offline, without TensorFlow.

Data: `tfds_data.write_fake` writes a tiny real array_record data set into tmp_path,
with the builder's own features and metadata, so the loader runs its production
read path; tfds' own decoding of the same files is the reference. (tfds.testing.mock_data
does not fit: in tfds 4.9.10 its data source's `__getitems__` raises TypeError,
and it redirects data_dir, so the loader's "is it prepared?" check sees nothing.)
Preparing (download_and_prepare) needs TensorFlow and network: those tests patch
it to fail or to write fake data, and no test may touch the network.
"""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import requests

tfds = pytest.importorskip("tensorflow_datasets")

from jaxunlearn import config as config_lib, datasets, tfds_data  # noqa: E402

# CIFAR-10's source, as tfds' checksums name it (what the messages must point to).
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
ARCHIVE = "cifar-10-binary.tar.gz"


def _config(data_dir, prepare=False, manual_dir=None, name="cifar10", **fields):
  c = config_lib.get_base_config().data
  c.update(dict(name=name, data_dir=str(data_dir), manual_dir=manual_dir, prepare=prepare,
                **fields))
  return c


def _load_error(config, error=tfds_data.DataNotReadyError) -> str:
  with pytest.raises(error) as info:
    datasets.load(config)
  message = str(info.value)
  assert "\n" not in message  # one line, actionable
  return message


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
  """The loader's reachability probe must not run unless a test fakes it."""
  def fail(*args, **kwargs):
    raise AssertionError("network access in a test")
  monkeypatch.setattr(requests, "head", fail)


def _archive(folder):
  """An (empty) archive file: enough for the probe to skip the network."""
  folder.mkdir(parents=True, exist_ok=True)
  (folder / ARCHIVE).touch()
  return str(folder)


@pytest.fixture
def no_download(monkeypatch):
  """Fails the test if tfds tries to download/prepare (network, TF)."""
  def fail(self, *args, **kwargs):
    raise AssertionError("download_and_prepare must not be called")
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fail)


def test_load_fake_cifar10(tmp_path):
  tfds_data.write_fake_cifar10(str(tmp_path), num_train=60, num_test=25)
  d = datasets.load(_config(tmp_path))
  assert isinstance(d, datasets.Dataset)
  assert d.train_images.shape == (60, 32, 32, 3) and d.test_images.shape == (25, 32, 32, 3)
  assert d.train_images.dtype == np.uint8 and d.train_labels.dtype == np.int32
  assert d.test_labels.dtype == np.int32
  assert set(d.train_labels.tolist()) == set(range(10))  # fake labels cycle classes
  assert 0 <= d.test_labels.min() and d.test_labels.max() < 10
  assert d.num_classes == 10 and d.pixel_max == 255
  assert d.class_names == tfds_data.CLASS_NAMES
  assert d.train_images.std() > 0


def test_fast_decode_matches_tfds_decode(tmp_path):
  """Our PIL decode of the skipped image bytes equals tfds' own decoding."""
  tfds_data.write_fake_cifar10(str(tmp_path), num_train=12, num_test=5)
  d = datasets.load(_config(tmp_path))
  reference = tfds.data_source("cifar10", split="test", data_dir=str(tmp_path), download=False)
  for i in range(5):
    example = reference[i]
    np.testing.assert_array_equal(d.test_images[i], example["image"])
    assert d.test_labels[i] == example["label"]


def test_missing_data_without_prepare_says_what_to_run(tmp_path, no_download):
  message = _load_error(_config(tmp_path / "none"))
  assert "CIFAR-10 not found at" in message and str(tmp_path / "none") in message
  assert f"python -m jaxunlearn.tfds_data --name cifar10 --data_dir {tmp_path / 'none'}" in message
  assert "pip install 'jaxunlearn[prepare]'" in message
  assert "cifar-10-binary.tar.gz" in message and "prepare=True" in message


def test_prepare_without_tensorflow_fails_fast(tmp_path, monkeypatch, no_download):
  monkeypatch.setattr(tfds_data, "missing_prepare_modules", lambda: ["tensorflow"])
  message = _load_error(_config(tmp_path, prepare=True, manual_dir="/dl"))
  assert "needs TensorFlow (missing: tensorflow)" in message
  assert "pip install 'jaxunlearn[prepare]'" in message
  command = f"python -m jaxunlearn.tfds_data --name cifar10 --data_dir {tmp_path} --manual_dir /dl"
  assert command in message


def test_prepare_unreachable_fails_fast(tmp_path, monkeypatch, no_download):
  monkeypatch.setattr(tfds_data, "missing_prepare_modules", lambda: [])
  def offline(url, **kwargs):
    raise requests.ConnectionError("Failed to resolve 'www.cs.toronto.edu'")
  monkeypatch.setattr(requests, "head", offline)
  message = _load_error(_config(tmp_path, prepare=True))
  assert f"Cannot reach {CIFAR10_URL}" in message and "ConnectionError" in message
  assert "by hand into a folder" in message and "manual_dir" in message
  assert f"python -m jaxunlearn.tfds_data --name cifar10 --data_dir {tmp_path}" in message


def test_prepare_failure_is_one_actionable_line(tmp_path, monkeypatch):
  monkeypatch.setattr(tfds_data, "missing_prepare_modules", lambda: [])
  def bad_archive(self, *args, **kwargs):
    raise ValueError("Artifact cifar-10-binary.tar.gz has wrong checksum:\n* Expected: ...")
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", bad_archive)
  manual_dir = _archive(tmp_path / "dl")
  message = _load_error(_config(tmp_path, prepare=True, manual_dir=manual_dir))
  assert "Could not prepare CIFAR-10" in message
  assert "ValueError: Artifact cifar-10-binary.tar.gz has wrong checksum:" in message
  assert f"{CIFAR10_URL} by hand into {manual_dir}" in message
  assert f"--manual_dir {manual_dir}" in message


@pytest.mark.parametrize("archive_in", ["manual_dir", "tfds_download_cache"])
def test_prepare_then_load(tmp_path, monkeypatch, archive_in):
  """prepare=True: array_record builder, manual_dir passed on, data read after.

  A local archive (manual_dir, or tfds' own download cache) skips the probe.
  """
  monkeypatch.setattr(tfds_data, "missing_prepare_modules", lambda: [])
  if archive_in == "manual_dir":
    manual_dir = _archive(tmp_path / "dl")
  else:
    manual_dir = None
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / "cs.toronto.edu_kriz_cifar-10-binaryxKOM.tar.gz").touch()
  calls = []
  def fake_prepare(self, *, download_config=None, **kwargs):
    manual = download_config.manual_dir
    calls.append((self.info.file_format.value, manual and str(manual)))
    tfds_data.write_fake_cifar10(str(tmp_path), num_train=20, num_test=10)
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fake_prepare)
  d = datasets.load(_config(tmp_path, prepare=True, manual_dir=manual_dir))
  assert calls == [("array_record", manual_dir)]
  assert d.train_images.shape == (20, 32, 32, 3) and d.test_labels.shape == (10,)
  datasets.load(_config(tmp_path, prepare=True))  # prepared: no second call
  assert len(calls) == 1


def test_tfrecord_only_data_is_rejected(tmp_path, no_download):
  variant = tfds_data.write_fake_cifar10(str(tmp_path), num_train=4, num_test=2)
  info_path = f"{variant}/dataset_info.json"
  with open(info_path) as f:
    info = json.load(f)
  info["fileFormat"] = "tfrecord"  # as `tfds build cifar10` without --file_format
  with open(info_path, "w") as f:
    json.dump(info, f)
  message = _load_error(_config(tmp_path))
  assert "stored as ['tfrecord']" in message and "needs array_record" in message


def test_main_prepares_or_exits_with_one_line(tmp_path, monkeypatch, capsys, no_download):
  tfds_data.write_fake_cifar10(str(tmp_path / "ok"), num_train=3, num_test=2)
  tfds_data.main(["--data_dir", str(tmp_path / "ok")])
  assert "CIFAR-10 ready at" in capsys.readouterr().out
  monkeypatch.setattr(tfds_data, "missing_prepare_modules", lambda: ["tensorflow"])
  with pytest.raises(SystemExit) as info:
    tfds_data.main(["--data_dir", str(tmp_path / "none")])
  assert str(info.value.code).startswith("error: Preparing CIFAR-10 needs TensorFlow")


def test_core_imports_without_tfds_and_reads_without_tensorflow(tmp_path):
  """Fresh interpreter: importing is tfds-free; datasets.load reads with no TF."""
  code = textwrap.dedent(f"""
      import sys
      from jaxunlearn import config as config_lib, datasets, tfds_data
      assert "tensorflow_datasets" not in sys.modules, "tfds imported eagerly"
      tfds_data.write_fake_cifar10({str(tmp_path)!r}, num_train=10, num_test=10)
      config = config_lib.get_base_config().data
      config.update(dict(name="cifar10", data_dir={str(tmp_path)!r}))
      d = datasets.load(config)
      assert d.train_images.shape == (10, 32, 32, 3), d.train_images.shape
      assert "tensorflow" not in sys.modules, "reading imported TensorFlow"
      """)
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-2000:]


# Class names the fake CIFAR-100 carries in its metadata (the real ones come from tfds'
# prepared label files); the loader must take them from there.
FINE_NAMES = tuple(f"fine_{i:02d}" for i in range(100))
COARSE_NAMES = tuple(f"coarse_{i:02d}" for i in range(20))


def _reference(name, data_dir, split):
  """Every example of a split as tfds itself decodes it (numpy, no TF)."""
  source = tfds.data_source(name, split=split, data_dir=str(data_dir), download=False)
  return [source[i] for i in range(len(source))]


def _assert_matches_reference(d, name, data_dir, label_key="label"):
  for split in ("train", "test"):
    reference = _reference(name, data_dir, split)
    images = getattr(d, f"{split}_images")
    assert images.shape[0] == len(reference) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, np.stack([e["image"] for e in reference]))
    np.testing.assert_array_equal(getattr(d, f"{split}_labels"), [e[label_key] for e in reference])


@pytest.fixture
def cifar100(tmp_path):
  tfds_data.write_fake("cifar100", str(tmp_path), num_train=60, num_test=30,
                       class_names={"label": FINE_NAMES, "coarse_label": COARSE_NAMES})
  return tmp_path


@pytest.mark.parametrize("label", ["", "fine", "label"])
def test_cifar100_fine_labels(cifar100, label):
  d = datasets.load(_config(cifar100, name="cifar100", label=label))
  assert d.num_classes == 100 and d.class_names == FINE_NAMES and d.pixel_max == 255
  assert d.train_images.shape == (60, 32, 32, 3)
  _assert_matches_reference(d, "cifar100", cifar100, "label")
  assert d.train_fine_labels is None and d.test_fine_labels is None and d.fine_class_names is None


@pytest.mark.parametrize("label", ["coarse", "coarse_label"])
def test_cifar20_coarse_labels_keep_the_fine_ones(cifar100, label):
  d = datasets.load(_config(cifar100, name="cifar100", label=label))
  assert d.num_classes == 20 and d.class_names == COARSE_NAMES
  _assert_matches_reference(d, "cifar100", cifar100, "coarse_label")
  assert d.fine_class_names == FINE_NAMES
  for split in ("train", "test"):
    reference = _reference("cifar100", cifar100, split)
    np.testing.assert_array_equal(getattr(d, f"{split}_fine_labels"),
                                  [e["label"] for e in reference])
  # Each fine class lies in one coarse class (what sub-class forgetting relies on).
  pairs = set(zip(d.train_fine_labels.tolist(), d.train_labels.tolist()))
  assert len(pairs) == len({fine for fine, _ in pairs})


def test_svhn(tmp_path):
  tfds_data.write_fake("svhn_cropped", str(tmp_path), num_train=30, num_test=12)
  d = datasets.load(_config(tmp_path, name="svhn_cropped"))
  assert d.num_classes == 10 and d.train_images.shape == (30, 32, 32, 3)
  _assert_matches_reference(d, "svhn_cropped", tmp_path)


def test_greyscale_mnist_has_one_channel(tmp_path):
  tfds_data.write_fake("mnist", str(tmp_path), num_train=20, num_test=10)
  d = datasets.load(_config(tmp_path, name="mnist"))
  assert d.train_images.shape == (20, 28, 28, 1) and d.num_classes == 10
  _assert_matches_reference(d, "mnist", tmp_path)


def test_image_size_resizes_when_loading(tmp_path):
  """Each image resized as torchvision's Resize does on a PIL image: PIL bilinear."""
  from PIL import Image
  tfds_data.write_fake_cifar10(str(tmp_path), num_train=10, num_test=5)
  d = datasets.load(_config(tmp_path, image_size=20))
  assert d.train_images.shape == (10, 20, 20, 3) and d.test_images.shape == (5, 20, 20, 3)
  for split in ("train", "test"):
    reference = [np.asarray(Image.fromarray(e["image"]).resize((20, 20), Image.BILINEAR))
                 for e in _reference("cifar10", tmp_path, split)]
    np.testing.assert_array_equal(getattr(d, f"{split}_images"), np.stack(reference))


def test_bad_label_fails_before_preparing(tmp_path, no_download):
  message = _load_error(_config(tmp_path / "none", name="cifar100", label="superclass"),
                        ValueError)
  assert message.startswith("config.data.label: cifar100 has no class label 'superclass'; "
                            "allowed: label, coarse_label, fine, coarse")
  message = _load_error(_config(tmp_path / "none", label="coarse"), ValueError)
  assert message.startswith("config.data.label: cifar10 has no class label 'coarse'")


def test_unknown_or_unfit_tfds_names(tmp_path, no_download):
  message = _load_error(_config(tmp_path, name="cifar1000"), ValueError)
  assert message.startswith("config.data.name: unknown data set 'cifar1000'")
  assert "closest: cifar100" in message
  message = _load_error(_config(tmp_path, name="imdb_reviews"), ValueError)
  assert message.startswith(
      "config.data.name: imdb_reviews is not an image-classification data set")


def test_missing_split_is_refused(tmp_path):
  variant = tfds_data.write_fake_cifar10(str(tmp_path), num_train=4, num_test=2)
  info_path = f"{variant}/dataset_info.json"
  with open(info_path) as f:
    info = json.load(f)
  info["splits"] = [s for s in info["splits"] if s["name"] != "test"]
  with open(info_path, "w") as f:
    json.dump(info, f)
  message = _load_error(_config(tmp_path), ValueError)
  assert message == "config.data.name: cifar10 has splits train; a run needs train and test"


def test_missing_cifar100_names_its_archive_and_command(tmp_path, no_download):
  message = _load_error(_config(tmp_path, name="cifar100"))
  assert message.startswith("CIFAR-100 not found at")
  assert f"python -m jaxunlearn.tfds_data --name cifar100 --data_dir {tmp_path}" in message
  assert "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz" in message


def test_main_prepares_any_name(tmp_path, capsys, no_download):
  tfds_data.write_fake("svhn_cropped", str(tmp_path), num_train=3, num_test=2)
  tfds_data.main(["--name", "svhn_cropped", "--data_dir", str(tmp_path)])
  assert "SVHN ready at" in capsys.readouterr().out
  with pytest.raises(SystemExit) as info:
    tfds_data.main(["--name", "cifar1000", "--data_dir", str(tmp_path)])
  assert str(info.value.code).startswith("error: config.data.name: unknown data set 'cifar1000'")
