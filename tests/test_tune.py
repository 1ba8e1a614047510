"""Tuning: held-out split, search spaces, trials that never recompile, a search end to end."""
import json
import os

import numpy as np
import optuna
import pytest

from jaxunlearn import config as config_lib, datasets, search, tune
from tests.test_pipeline import tiny_config


def tune_config(methods="finetune,ssd", trials=3):
  c = tiny_config()
  c.tsne.num_forget = c.tsne.num_retain = 0
  c.seeds = "2"
  c.tune.methods, c.tune.trials = methods, trials
  c.tune.space = "finetune.epochs=1:3,finetune.learning_rate=1e-3:1e-1"
  return c


def test_held_out_is_a_stratified_part_of_the_training_set():
  data = datasets.load(tiny_config().data)
  held = tune.held_out(data, 0.1, seed=3)
  n = len(data.train_labels)
  assert len(held.train_labels) + len(held.test_labels) == n
  assert abs(len(held.test_labels) - round(0.1 * n)) <= 1
  # Every validation image is a training image, none is a test image, none is kept for training.
  train_rows = {r.tobytes() for r in data.train_images}
  assert all(r.tobytes() in train_rows for r in held.test_images)
  val_rows = {r.tobytes() for r in held.test_images}
  assert not any(r.tobytes() in val_rows for r in held.train_images)
  # Stratified: each class's share of the validation set is its share of the training set.
  share = np.bincount(data.train_labels) / n
  val_share = np.bincount(held.test_labels, minlength=len(share)) / len(held.test_labels)
  np.testing.assert_allclose(val_share, share, atol=0.02)


def test_space_narrows_and_fixes_the_declared_one():
  c = tune_config()
  c.tune.space = "scrub.alpha=0.001:0.1,scrub.max_epochs=2,salun.mask_fraction=0.3:0.6"
  scrub = search.space(c, "scrub")
  assert scrub["alpha"] == search.Range(0.001, 0.1, log=True)
  assert scrub["max_epochs"] == search.Range(2, 2, integer=True)
  assert scrub["learning_rate"] == search.training()["learning_rate"]
  values = search.suggest(optuna.trial.FixedTrial(
      {"alpha": 0.01, "gamma": 0.5, "learning_rate": 1e-3, "epochs": 4}), scrub)
  assert values == {"alpha": 0.01, "gamma": 0.5, "learning_rate": 1e-3, "epochs": 4,
                    "max_epochs": 2}


@pytest.mark.parametrize("field, value, message", [
    ("tune.space", "scrub.alpha", "must be method.field=value"),
    ("tune.space", "nope.alpha=1", "unknown method 'nope'"),
    ("tune.space", "scrub.temperature=1:2", "scrub searches learning_rate, epochs"),
    ("tune.space", "scrub.alpha=0:1", "both > 0 (log scale)"),
    ("tune.space", "scrub.max_epochs=1.5:2", "integers"),
    ("tune.space", "scrub.alpha=2:1", "needs low <= high"),
    ("tune.objective", "accuracy", "unknown objective 'accuracy'"),
    ("tune.sampler", "grid", "allowed"),
    ("tune.methods", "finetune,nope", "unknown method 'nope'"),
    ("tune.seed", 1, "also an evaluation seed"),
    ("data.validation_fraction", 1.0, "config.data.validation_fraction"),
    ("distributed", True, "not across hosts"),
])
def test_bad_search_settings_are_one_line(field, value, message):
  c = tune_config()
  section, _, name = field.rpartition(".")
  (c[section] if section else c)[name] = value
  if field == "distributed":
    field = "tune.methods"
  with pytest.raises(ValueError, match="config." + field.replace(".", r"\.")) as e:
    config_lib.validate(c)
  assert message in str(e.value) and "\n" not in str(e.value)


def test_tuned_json_is_applied_and_checked(tmp_path):
  path = tmp_path / "tuned.json"
  path.write_text(json.dumps({"scrub": {"alpha": 0.05, "epochs": 7}}))
  c = tune_config()
  c.tuned = str(path)
  config_lib.validate(c)
  tuned = search.with_tuned(c)
  assert (tuned.scrub.alpha, tuned.scrub.epochs) == (0.05, 7)
  assert isinstance(tuned.scrub.epochs, int) and c.scrub.alpha == 0.001  # a copy
  for bad in ({"scrub": {"temperature": 2.0}}, [1, 2], {"nope": {"alpha": 1}}):
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"^config\.tuned: "):
      search.with_tuned(c)
  c.tuned = str(tmp_path / "missing.json")
  with pytest.raises(ValueError, match="cannot read"):
    search.with_tuned(c)


def test_diverged_trials_score_worst():
  assert tune.objective_value({"diverged_step": 3}, "avg_gap") == 100.0
  assert tune.objective_value({"diverged_step": 3}, "tow") == 0.0
  assert tune.objective_value({"avg_gap": 1.5}, "avg_gap") == 1.5


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
  c = tune_config()
  s = tune.Search(c)
  s.train(str(tmp_path_factory.mktemp("search")))
  return c, s


def test_search_never_sees_the_test_set(searched):
  c, s = searched
  data = datasets.load(c.data)
  assert int(s.trainer.test[1].shape[0]) == round(0.1 * len(data.train_labels))
  assert int(s.trainer.train[1].shape[0]) + int(s.trainer.test[1].shape[0]) == len(data.train_labels)


def test_trials_never_recompile(searched):
  c, s = searched
  first = s.trial("finetune", {"learning_rate": 0.01, "epochs": 1})
  traces = s.trainer.num_traces
  second = s.trial("finetune", {"learning_rate": 0.05, "epochs": 3})
  third = s.trial("finetune", {"learning_rate": 0.001, "epochs": 2})
  assert s.trainer.num_traces == traces
  assert second["compile_seconds"] == third["compile_seconds"] == 0.0
  assert first["retain_train_acc"] != second["retain_train_acc"]
  s.trial("ssd", {"alpha": 1.0, "dampening": 1.0})
  traces = s.trainer.num_traces
  s.trial("ssd", {"alpha": 30.0, "dampening": 0.5})
  assert s.trainer.num_traces == traces
  for k in ("avg_gap", "tow", "run_seconds", "eval_seconds"):
    assert np.isfinite(third[k])


@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("tune"))
  return workdir, tune.run(tune_config(), workdir)


def test_search_writes_tables_figures_and_tuned_settings(tuned_run):
  workdir, out = tuned_run
  with open(os.path.join(workdir, "tuned.json")) as f:
    tuned = json.load(f)
  assert set(tuned) == {"finetune", "ssd"}
  assert 1 <= tuned["finetune"]["epochs"] <= 3 and 1e-3 <= tuned["finetune"]["learning_rate"] <= 0.1
  assert 0.1 <= tuned["ssd"]["alpha"] <= 100
  for m in ("finetune", "ssd"):
    row = out["tuning"][m]
    assert row["trials"] == 3 and row["best"] == min(t["value"] for t in row["all_trials"])
    assert os.path.exists(os.path.join(workdir, "tuning", f"{m}_history.png"))
  text = open(os.path.join(workdir, "tuning", "tuning.md")).read()
  assert "| Fine-tuning | " in text and "| SSD | alpha=" in text
  # The tuned methods on the evaluation seeds, with the tuned settings.
  with open(os.path.join(workdir, "eval", "results.json")) as f:
    results = json.load(f)
  assert sorted(results["seeds"]) == ["0", "1"]
  with open(os.path.join(workdir, "eval", "seed_0", "config.json")) as f:
    used = json.load(f)
  assert used["finetune"]["epochs"] == tuned["finetune"]["epochs"]
  assert used["ssd"]["alpha"] == pytest.approx(tuned["ssd"]["alpha"])


def test_search_resumes_and_reuses(tuned_run):
  workdir, _ = tuned_run
  storage = f"sqlite:///{os.path.join(workdir, 'tuning', 'optuna.db')}"
  study = optuna.load_study(study_name="finetune", storage=storage)
  c = tune_config()  # the first trial is the config's own settings, clipped into the space
  assert study.trials[0].params == {"learning_rate": max(c.finetune.learning_rate, 1e-3),
                                    "epochs": c.finetune.epochs}
  study.ask()  # a trial a killed search left running
  c = tune_config(trials=4)
  out = tune.run(c, workdir)
  study = optuna.load_study(study_name="finetune", storage=storage)
  states = [t.state for t in study.trials]
  assert states.count(optuna.trial.TrialState.COMPLETE) == 4
  assert states.count(optuna.trial.TrialState.FAIL) == 1
  assert out["tuning"]["ssd"]["trials"] == 4
  # Another space in the same workdir is refused with one line.
  c.tune.space = "finetune.epochs=1:2"
  with pytest.raises(ValueError, match="optuna.db"):
    tune.run(c, workdir)
