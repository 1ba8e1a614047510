"""The study's real setup (configs/cifar10_vit_tiny.py) end to end, offline.

CIFAR-10 is replaced by a small fake data set in tfds' array_record layout and the
ImageNet weights by a randomly initialised transformers ViT saved as safetensors;
everything else is the real path from the command line to results.json.
"""
import json
import os
import subprocess
import sys

import torch
import transformers

from jaxunlearn import tfds_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cifar10_config_runs_end_to_end_from_the_command_line(tmp_path):
  tfds_data.write_fake_cifar10(str(tmp_path / "tfds"), num_train=96, num_test=40)
  torch.manual_seed(0)
  vit = transformers.ViTForImageClassification(transformers.ViTConfig(
      image_size=32, patch_size=8, num_channels=3, hidden_size=24, num_hidden_layers=1,
      num_attention_heads=2, intermediate_size=48, hidden_act="gelu", layer_norm_eps=1e-6,
      num_labels=1000))
  vit.save_pretrained(tmp_path / "weights")
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "jaxunlearn.main",
         "--config", os.path.join(ROOT, "configs", "cifar10_vit_tiny.py"), "--workdir", str(workdir),
         f"--config.data.data_dir={tmp_path / 'tfds'}", f"--config.model.init={tmp_path / 'weights'}",
         "--config.model.vit.variant=", "--config.model.vit.image_size=48",  # exercises the resize
         "--config.train.epochs=1", "--config.finetune.epochs=1", "--config.gradient_ascent.epochs=1",
         "--config.two_stage.epochs=1", "--config.batch_size=16",
         "--config.tsne.num_retain=16", "--config.tsne.num_forget=4", "--config.progress=false"]
  env = dict(os.environ, HF_HUB_OFFLINE="1")
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  with open(workdir / "results.json") as f:
    results = json.load(f)
  assert results["config"]["data"]["name"] == "cifar10"
  assert results["config"]["model"]["vit"]["image_size"] == 48
  assert set(results["models"]) == {"original", "retrain", "finetune", "gradient_ascent", "two_stage"}
  assert results["models"]["retrain"]["forget_test_acc"] == 0
  assert (workdir / "tsne.png").exists()


def test_cifar10_config_without_data_says_what_to_run(tmp_path):
  cmd = [sys.executable, "-m", "jaxunlearn.main",
         "--config", os.path.join(ROOT, "configs", "cifar10_vit_tiny.py"),
         "--workdir", str(tmp_path / "run"), f"--config.data.data_dir={tmp_path / 'empty'}"]
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert out.returncode != 0
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("error: CIFAR-10 not found") and "jaxunlearn.tfds_data" in last, out.stderr[-2000:]
