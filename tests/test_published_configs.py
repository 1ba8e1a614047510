"""The published-table configs (configs/cifar10_resnet18.py, configs/cifar100_resnet18.py)
from the command line, offline: fake data sets of the real layout, a tiny ResNet, one epoch.

configs/cifar20_subclass_resnet18.py runs the same way in tests/test_subclass.py.
"""
import json
import os
import subprocess
import sys

import importlib.util

from jaxunlearn import datasets, scenario, tfds_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The config's own recipe, shrunk: a ResNet with 4 channels and one block per stage.
TINY = ["--config.model.resnet.width=4", "--config.model.resnet.stage_sizes=1,1,1,1",
        "--config.batch_size=32", "--config.train.epochs=1", "--config.train.schedule=constant",
        "--config.train.warmup_epochs=0", "--config.finetune.epochs=1",
        "--config.random_labels.epochs=1",
        "--config.eval.batch_size=100",
        "--config.tsne.num_retain=0", "--config.tsne.num_forget=0", "--config.progress=false"]


def _config(name: str):
  spec = importlib.util.spec_from_file_location("published", os.path.join(ROOT, "configs", name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _run(config: str, workdir, *flags) -> tuple[dict, str]:
  cmd = [sys.executable, "-m", "jaxunlearn.main", "--config",
         os.path.join(ROOT, "configs", config), "--workdir", str(workdir), *TINY, *flags]
  env = dict(os.environ, PYTHONPATH=ROOT)
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f), out.stdout + out.stderr


def test_cifar10_resnet18_random_forgetting_holds_out_a_tenth(tmp_path):
  tfds_data.write_fake_cifar10(str(tmp_path / "tfds"), num_train=200, num_test=50)
  results, output = _run("cifar10_resnet18.py", tmp_path / "run",
                         f"--config.data.data_dir={tmp_path / 'tfds'}",
                         "--config.scenario=random", "--config.methods=random_labels")
  recorded = results["config"]
  assert recorded["data"]["hold_out"] == 0.1 and recorded["data"]["augment"] == "crop_flip"
  assert recorded["model"]["name"] == "resnet18"
  assert set(results["models"]) == {"original", "retrain", "random_labels"}
  # What the run trained on: 200 training images less the held-out 20; a tenth of the
  # 180 forgotten.
  c = _config("cifar10_resnet18.py")
  c.data.data_dir, c.scenario = str(tmp_path / "tfds"), "random"
  data = datasets.load(c.data)
  scene = scenario.from_config(c, data)
  assert (len(data.train_labels), int(scene.forget_train.sum())) == (180, 18)


def test_cifar100_resnet18_forgets_rocket(tmp_path):
  names = tuple("rocket" if i == 69 else f"fine_{i:02d}" for i in range(100))
  tfds_data.write_fake("cifar100", str(tmp_path / "tfds"), num_train=300, num_test=100,
                       class_names={"label": names})
  results, output = _run("cifar100_resnet18.py", tmp_path / "run",
                         f"--config.data.data_dir={tmp_path / 'tfds'}",
                         "--config.methods=finetune")
  assert results["config"]["forget_class"] == "69"
  assert results["models"]["retrain"]["forget_test_acc"] == 0
  assert "Forgotten: class 69 (rocket)" in output
