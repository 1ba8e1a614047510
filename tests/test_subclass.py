"""Sub-class forgetting: train on coarse labels, forget one fine class (SSD's CIFAR-20 setting).

On digits paired into 5 coarse classes (offline) and on a fake CIFAR-100 with its
coarse labels (CIFAR-20), from the scenario up to the command line.
"""
import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from jaxunlearn import config as config_lib, datasets, evaluate, pipeline, privacy, scenario, tfds_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**overrides):
  c = config_lib.get_base_config()
  c.scenario, c.data.label, c.forget_subclass = "subclass", "coarse", "3"
  for k, v in overrides.items():
    section, _, name = k.rpartition(".")
    (c[section] if section else c)[name] = v
  return c


def _error(fn, *args) -> str:
  with pytest.raises(ValueError) as e:
    fn(*args)
  return str(e.value)


def test_digits_subclass_forgets_one_fine_class_inside_its_coarse_class():
  c = _config()
  data = datasets.load(c.data)
  scene = scenario.from_config(c, data)
  assert scene.kind == "subclass" and scene.classes == (1,)
  np.testing.assert_array_equal(scene.forget_train, data.train_fine_labels == 3)
  np.testing.assert_array_equal(scene.forget_test, data.test_fine_labels == 3)
  # The forgotten examples keep their coarse label: "2-3".
  assert set(data.train_labels[scene.forget_train]) == {1}
  # Gold and every retain stream never see them; "2" stays in the retain set.
  pools = scene.pools()
  assert not np.isin(pools["retain"], np.flatnonzero(data.train_fine_labels == 3)).any()
  assert np.isin(np.flatnonzero(data.train_fine_labels == 2), pools["retain"]).all()
  assert scene.what == "sub-class 3 of class 1 (2-3)"
  assert "(sub-class 3 of class 1 (2-3))" in scene.describe()


def test_subclass_by_name_on_fake_cifar20(tmp_path):
  fine = tuple(f"fine_{i:02d}" for i in range(100))
  coarse = tuple(f"coarse_{i:02d}" for i in range(20))
  tfds_data.write_fake("cifar100", str(tmp_path), num_train=300, num_test=100,
                       class_names={"label": fine, "coarse_label": coarse})
  c = _config(**{"data.name": "cifar100", "data.data_dir": str(tmp_path),
                 "forget_subclass": "fine_27"})
  data = datasets.load(c.data)
  scene = scenario.from_config(c, data)
  assert scene.classes == (7,) and scene.forget_train.sum() == 3 and scene.forget_test.sum() == 1
  assert scene.what == "sub-class 27 (fine_27) of class 7 (coarse_07)"
  c.forget_subclass = "rocket"
  assert _error(scenario.from_config, c, data).startswith(
      "config.forget_subclass: 'rocket' is not a fine class of the data set; allowed: a name "
      "(fine_00, fine_01,")


@pytest.mark.parametrize("overrides, message", [
    ({"data.label": ""}, 'config.scenario: "subclass" needs coarse labels over fine ones, which '
                         "digits with data.label='' lacks; set data.label=coarse"),
    ({"forget_subclass": "10"}, "config.forget_subclass: '10' is not a fine class"),
])
def test_subclass_bad_input_is_one_line(overrides, message):
  c = _config(**overrides)
  assert _error(lambda: scenario.from_config(c, datasets.load(c.data))).startswith(message)


def test_subclass_needs_a_fine_class():
  message = _error(config_lib.validate, _config(forget_subclass=" "))
  assert message.startswith('config.forget_subclass: is empty; scenario "subclass" needs')


def test_subclass_metrics_judge_the_fine_class_by_its_coarse_label():
  """Forget accuracy on the fine class's train/test examples against their coarse labels;
  retain and test accuracy without them (numpy)."""
  rng = np.random.default_rng(0)
  fine_tr, fine_te = rng.integers(0, 10, 200), rng.integers(0, 10, 80)
  ytr, yte = fine_tr // 2, fine_te // 2
  ptr = rng.dirichlet(np.ones(5), 200).astype(np.float32)
  pte = rng.dirichlet(np.ones(5), 80).astype(np.float32)
  f_tr, f_te = fine_tr == 3, fine_te == 3
  got = evaluate.summarize(ptr, ytr, pte, yte, pte, f_tr, f_te)
  ok_tr, ok_te = ptr.argmax(1) == ytr, pte.argmax(1) == yte
  np.testing.assert_allclose(float(got["forget_train_acc"]), 100 * ok_tr[f_tr].mean(), rtol=1e-5)
  np.testing.assert_allclose(float(got["forget_test_acc"]), 100 * ok_te[f_te].mean(), rtol=1e-5)
  np.testing.assert_allclose(float(got["retain_train_acc"]), 100 * ok_tr[~f_tr].mean(), rtol=1e-5)
  np.testing.assert_allclose(float(got["retain_test_acc"]), 100 * ok_te[~f_te].mean(), rtol=1e-5)


def test_subclass_privacy_metrics_use_the_fine_class_and_coarse_labels(monkeypatch):
  """The sets each privacy metric gets in the sub-class scenario, written out in numpy:
  MIA-efficacy's non-members are the test set without the fine class; loss-MIA compares
  the fine class's training losses with its test losses; the probe fits every training
  example's coarse label and is scored on the fine class's test examples."""
  seen = {}
  monkeypatch.setattr(privacy, "mia_efficacy", lambda m, n, t: seen.update(mia=(m, n, t)) or 0.0)
  monkeypatch.setattr(privacy, "loss_mia", lambda f, n, seed: seen.update(loss=(f, n)) or (0.0, 0.0))
  monkeypatch.setattr(privacy, "linear_probe_accuracy",
                      lambda a, b, c, d: seen.update(probe=(a, b, c, d)) or 0.0)
  rng = np.random.default_rng(1)
  N, M = 60, 30
  fine_tr, fine_te = np.arange(N) % 10, np.arange(M) % 10
  ytr, yte = fine_tr // 2, fine_te // 2  # 5 coarse classes of two fine ones
  ptr, pte = rng.dirichlet(np.ones(5), N), rng.dirichlet(np.ones(5), M)
  ftr, fte = rng.normal(size=(N, 4)), rng.normal(size=(M, 4))
  ltr, lte = rng.exponential(size=N), rng.exponential(size=M)
  f_tr, f_te = fine_tr == 3, fine_te == 3
  out = evaluate.privacy_metrics(f_tr, f_te, ptr, ytr, pte, yte, ftr, fte, train_loss_N=ltr,
                                 test_loss_M=lte, seed=0, class_wise=True)
  assert set(out) == {"mia_efficacy", "loss_mia", "indiscernibility", "probe_forget_acc"}
  conf_tr, conf_te = ptr[np.arange(N), ytr], pte[np.arange(M), yte]
  member, nonmember, target = seen["mia"]
  np.testing.assert_array_equal(nonmember, conf_te[~f_te])  # the fine class's sibling stays
  np.testing.assert_array_equal(member, conf_tr[~f_tr][:M - f_te.sum()])
  np.testing.assert_array_equal(target, conf_tr[f_tr])  # confidence in the coarse label
  f, n = seen["loss"]
  np.testing.assert_array_equal(f, ltr[f_tr])
  np.testing.assert_array_equal(n, lte[f_te])
  a, b, c, d = seen["probe"]
  np.testing.assert_array_equal(a, ftr)
  np.testing.assert_array_equal(b, ytr)
  np.testing.assert_array_equal(c, fte[f_te])
  np.testing.assert_array_equal(d, yte[f_te])


def test_digits_subclass_end_to_end(tmp_path):
  c = _config()
  c.model.vit.patch_size, c.model.vit.hidden_size, c.model.vit.depth = 4, 16, 1
  c.model.vit.num_heads, c.model.vit.mlp_dim = 2, 32
  c.train.epochs, c.train.learning_rate = 4, 0.05
  c.methods, c.finetune.epochs = "finetune", 1
  c.tsne.num_forget, c.tsne.num_retain = 8, 8
  c.progress = False
  out = pipeline.train_and_evaluate(c, str(tmp_path))
  assert set(out["models"]) == {"original", "retrain", "finetune"}
  for m in out["models"].values():  # the class-wise metrics, on the fine class
    for k in ("forget_test_acc", "retain_test_acc", "mia_efficacy", "loss_mia", "probe_forget_acc"):
      assert np.isfinite(m[k]), k
  with open(tmp_path / "results.md") as f:
    assert "Forgotten: sub-class 3 of class 1 (2-3)" in f.read()


def test_cifar20_subclass_config_from_the_command_line(tmp_path):
  fine = tuple(f"fine_{i:02d}" for i in range(100))
  tfds_data.write_fake("cifar100", str(tmp_path / "tfds"), num_train=300, num_test=100,
                       class_names={"label": fine})
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "jaxunlearn.main",
         "--config", os.path.join(ROOT, "configs", "cifar20_subclass_resnet18.py"),
         "--workdir", str(workdir), f"--config.data.data_dir={tmp_path / 'tfds'}",
         "--config.forget_subclass=fine_27", "--config.model.resnet.width=4",
         "--config.model.resnet.stage_sizes=1,1,1,1", "--config.batch_size=32",
         "--config.train.epochs=1", "--config.train.schedule=constant", "--config.methods=finetune,ssd", "--config.finetune.epochs=1",
         "--config.eval.batch_size=100", "--config.tsne.num_retain=0",
         "--config.tsne.num_forget=0", "--config.progress=false"]
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  with open(workdir / "results.json") as f:
    results = json.load(f)
  assert results["config"]["data"]["label"] == "coarse"
  assert set(results["models"]) == {"original", "retrain", "finetune", "ssd"}
  assert "Forgotten: sub-class 27 (fine_27) of class 7" in out.stdout
