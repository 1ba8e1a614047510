"""CIFAR-10 via tfds, offline and without TensorFlow.

Data: `tfds_data.write_fake_cifar10` writes a tiny real array_record dataset into
tmp_path, so the loader runs its production read path. (tfds.testing.mock_data
does not fit: in tfds 4.9.10 its data source's `__getitems__` raises TypeError,
and it redirects data_dir, so the loader's "is it prepared?" check sees nothing.)
Preparing (download_and_prepare) needs TensorFlow and network: those tests patch
it to fail or to write fake data, and no test may touch the network.
"""
import json
import subprocess
import sys
import textwrap

import ml_collections
import numpy as np
import pytest
import requests

tfds = pytest.importorskip("tensorflow_datasets")

from jaxunlearn import datasets, tfds_data  # noqa: E402


def _config(data_dir, prepare=False, manual_dir=None):
  return ml_collections.ConfigDict(dict(name="cifar10", data_dir=str(data_dir),
                                        manual_dir=manual_dir, prepare=prepare))


def _load_error(config) -> str:
  with pytest.raises(tfds_data.Cifar10NotReadyError) as info:
    datasets.load_cifar10(config)
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
  (folder / tfds_data.ARCHIVE).touch()
  return str(folder)


@pytest.fixture
def no_download(monkeypatch):
  """Fails the test if tfds tries to download/prepare (network, TF)."""
  def fail(self, *args, **kwargs):
    raise AssertionError("download_and_prepare must not be called")
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fail)


def test_load_fake_cifar10(tmp_path):
  tfds_data.write_fake_cifar10(str(tmp_path), num_train=60, num_test=25)
  d = datasets.load_cifar10(_config(tmp_path))
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
  d = datasets.load_cifar10(_config(tmp_path))
  reference = tfds.data_source("cifar10", split="test", data_dir=str(tmp_path), download=False)
  for i in range(5):
    example = reference[i]
    np.testing.assert_array_equal(d.test_images[i], example["image"])
    assert d.test_labels[i] == example["label"]


def test_missing_data_without_prepare_says_what_to_run(tmp_path, no_download):
  message = _load_error(_config(tmp_path / "none"))
  assert "CIFAR-10 not found at" in message and str(tmp_path / "none") in message
  assert f"python -m jaxunlearn.tfds_data --data_dir {tmp_path / 'none'}" in message
  assert "pip install 'jaxunlearn[prepare]'" in message
  assert "cifar-10-binary.tar.gz" in message and "prepare=True" in message


def test_prepare_without_tensorflow_fails_fast(tmp_path, monkeypatch, no_download):
  monkeypatch.setattr(tfds_data, "missing_prepare_modules", lambda: ["tensorflow"])
  message = _load_error(_config(tmp_path, prepare=True, manual_dir="/dl"))
  assert "needs TensorFlow (missing: tensorflow)" in message
  assert "pip install 'jaxunlearn[prepare]'" in message
  assert f"python -m jaxunlearn.tfds_data --data_dir {tmp_path} --manual_dir /dl" in message


def test_prepare_unreachable_fails_fast(tmp_path, monkeypatch, no_download):
  monkeypatch.setattr(tfds_data, "missing_prepare_modules", lambda: [])
  def offline(url, **kwargs):
    raise requests.ConnectionError("Failed to resolve 'www.cs.toronto.edu'")
  monkeypatch.setattr(requests, "head", offline)
  message = _load_error(_config(tmp_path, prepare=True))
  assert f"Cannot reach {tfds_data.SOURCE_URL}" in message and "ConnectionError" in message
  assert "by hand into a folder" in message and "manual_dir" in message
  assert f"python -m jaxunlearn.tfds_data --data_dir {tmp_path}" in message


def test_prepare_failure_is_one_actionable_line(tmp_path, monkeypatch):
  monkeypatch.setattr(tfds_data, "missing_prepare_modules", lambda: [])
  def bad_archive(self, *args, **kwargs):
    raise ValueError("Artifact cifar-10-binary.tar.gz has wrong checksum:\n* Expected: ...")
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", bad_archive)
  manual_dir = _archive(tmp_path / "dl")
  message = _load_error(_config(tmp_path, prepare=True, manual_dir=manual_dir))
  assert "Could not prepare CIFAR-10" in message
  assert "ValueError: Artifact cifar-10-binary.tar.gz has wrong checksum:" in message
  assert f"{tfds_data.SOURCE_URL} by hand into {manual_dir}" in message
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
  d = datasets.load_cifar10(_config(tmp_path, prepare=True, manual_dir=manual_dir))
  assert calls == [("array_record", manual_dir)]
  assert d.train_images.shape == (20, 32, 32, 3) and d.test_labels.shape == (10,)
  datasets.load_cifar10(_config(tmp_path, prepare=True))  # prepared: no second call
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
      import ml_collections
      from jaxunlearn import datasets, tfds_data
      assert "tensorflow_datasets" not in sys.modules, "tfds imported eagerly"
      tfds_data.write_fake_cifar10({str(tmp_path)!r}, num_train=10, num_test=10)
      config = ml_collections.ConfigDict(dict(
          name="cifar10", data_dir={str(tmp_path)!r}, manual_dir=None, prepare=False))
      d = datasets.load(config)
      assert d.train_images.shape == (10, 32, 32, 3), d.train_images.shape
      assert "tensorflow" not in sys.modules, "reading imported TensorFlow"
      """)
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-2000:]
