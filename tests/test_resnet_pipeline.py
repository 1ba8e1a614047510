"""ResNet-18 through the whole pipeline: the command line with every method, scenario and seeds;
a crash inside a stage resumes to the same results (BatchNorm statistics in the snapshots);
a workdir of the previous checkpoint layout stops with one line."""
import json
import os
import subprocess
import sys

import pytest

from jaxunlearn import checkpoints, pipeline
from jaxunlearn.methods import METHODS
from tests.test_pipeline import ROOT, load_config
from tests.test_reliability import Crash, read_results, without_timing

TINY_RESNET = ["--config.model.resnet.width=4", "--config.model.resnet.stage_sizes=1,1",
               "--config.train.epochs=2", "--config.progress=false", "--config.tsne.num_retain=0",
               "--config.tsne.num_forget=0"]


def tiny_resnet_config():
  c = load_config("digits_resnet")
  c.model.resnet.width, c.model.resnet.stage_sizes = 4, "1,1"
  c.train.epochs, c.train.decay_epochs = 3, "2"
  for m in ("finetune", "gradient_ascent", "two_stage"):
    c[m].epochs = 2
  c.steps_per_chunk = 5
  c.checkpoint_every_chunks, c.checkpoint_every_seconds = 2, 0.0
  c.tsne.num_forget = c.tsne.num_retain = 0
  c.progress = False
  return c


@pytest.mark.slow
def test_every_method_random_scenario_and_seeds_from_the_command_line(tmp_path):
  epochs = [f"--config.{m}.epochs=1" for m in ("finetune", "gradient_ascent", "two_stage",
                                                "random_labels", "salun", "l1_sparse",
                                                "neggrad_plus", "scrub", "boundary_shrinking",
                                                "delete", "fcs")]
  cmd = [sys.executable, "-m", "jaxunlearn.main", "--config",
         os.path.join(ROOT, "configs/digits_resnet.py"), "--workdir", str(tmp_path),
         "--config.train.decay_epochs=1", "--config.methods=all", "--config.scenario=random",
         "--config.seeds=0,1", *TINY_RESNET, *epochs]
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  with open(tmp_path / "results.json") as f:
    results = json.load(f)
  assert results["config"]["model"]["name"] == "resnet18"
  assert set(results["seeds"]) == {"0", "1"}
  for seed in results["seeds"].values():
    assert len(seed) == 2 + len(METHODS)  # Original, Gold and every method
    for name, row in seed.items():
      assert "diverged_step" in row or 0 <= row["retain_test_acc"] <= 100, (name, row)


def test_a_crash_inside_a_resnet_stage_resumes_to_the_same_results(tmp_path, monkeypatch):
  reference = tmp_path / "reference"
  pipeline.train_and_evaluate(tiny_resnet_config(), str(reference))
  real_save = checkpoints.Snapshots.save
  saved = []

  def save_then_crash(self, position, arrays, log):
    real_save(self, position, arrays, log)
    saved.append(self.path)
    assert "batch_stats" in arrays["model_state"]
    if self.path.endswith("original.partial") and len(saved) >= 2:
      raise Crash("killed")

  monkeypatch.setattr(checkpoints.Snapshots, "save", save_then_crash)
  crashed = tmp_path / "crashed"
  with pytest.raises(Crash):
    pipeline.train_and_evaluate(tiny_resnet_config(), str(crashed))
  monkeypatch.setattr(checkpoints.Snapshots, "save", real_save)
  pipeline.train_and_evaluate(tiny_resnet_config(), str(crashed))
  assert without_timing(read_results(crashed)) == without_timing(read_results(reference))


def test_a_checkpoint_of_the_old_layout_gives_one_line(tmp_path):
  path = str(tmp_path / "checkpoints" / "original")
  checkpoints.save(path, 1, arrays={"w": [1.0]}, record={"inputs": {}})
  # Rewrite the record as an older version wrote it: no layout, digest of that record.
  step = os.path.join(path, "1", "record", "metadata")
  with open(step) as f:
    record = json.load(f)
  del record["layout"], record["record_digest"]
  record["record_digest"] = checkpoints._record_digest(record)
  with open(step, "w") as f:
    json.dump(record, f)
  with pytest.raises(checkpoints.CheckpointError) as e:
    checkpoints.restore(path)
  message = str(e.value)
  assert "\n" not in message and "layout 1" in message and "new --workdir" in message
