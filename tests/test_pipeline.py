"""The study end to end on a tiny config: files, schema, resuming, bad input."""
import json
import os
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest

from jaxunlearn import checkpoints, config as config_lib, pipeline, report, scheduler, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ("original", "retrain", "finetune", "gradient_ascent", "two_stage")
METRICS = ("forget_train_acc", "forget_test_acc", "retain_train_acc", "retain_test_acc",
           "entropy_forget_test", "jsd_gold_forget_test", "seconds", "compile_seconds",
           "mia_efficacy", "loss_mia", "indiscernibility", "probe_forget_acc", "avg_gap", "tow", "rte")


def load_config(name):
  import importlib.util
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def tiny_config():
  c = load_config("digits")
  c.model.vit.patch_size, c.model.vit.hidden_size, c.model.vit.depth = 4, 16, 1
  c.model.vit.num_heads, c.model.vit.mlp_dim = 2, 32
  c.train.epochs, c.train.learning_rate = 10, 0.05
  for m in ("finetune", "gradient_ascent", "two_stage"):
    c[m].epochs = 1
  c.tsne.num_forget, c.tsne.num_retain = 20, 20
  c.progress = False
  return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  return workdir, pipeline.train_and_evaluate(tiny_config(), workdir)


def test_files_and_schema(run):
  workdir, results = run
  with open(os.path.join(workdir, "results.json")) as f:
    on_disk = json.load(f)
  assert on_disk == json.loads(json.dumps(results))
  assert on_disk["config"]["data"]["name"] == "digits"
  assert tuple(on_disk["models"]) == MODELS
  for m in MODELS:
    for k in METRICS:
      assert np.isfinite(on_disk["models"][m][k]), (m, k)
    for k in METRICS[:4]:
      assert 0 <= on_disk["models"][m][k] <= 100
    assert os.path.isdir(os.path.join(workdir, "checkpoints", m))
  with open(os.path.join(workdir, "tsne.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with open(os.path.join(workdir, "results.csv")) as f:
    rows = f.read().strip().splitlines()
  assert rows[0].startswith("model,forget_train_acc,retain_test_acc") and len(rows) == 6
  with open(os.path.join(workdir, "results.md")) as f:
    md = f.read()
  assert "| Gold (retrain) |" in md and "| 2-Stage |" in md


def test_original_learns_and_gold_is_its_own_reference(run):
  models = run[1]["models"]
  assert models["original"]["forget_train_acc"] > 10  # better than chance on the forget class
  assert models["retrain"]["forget_test_acc"] == 0  # never saw the class: never predicts it
  assert models["retrain"]["jsd_gold_forget_test"] == pytest.approx(0, abs=1e-6)


def test_rerun_reuses_every_stage(run, monkeypatch):
  workdir, results = run

  def no_training(*a, **k):
    raise AssertionError("a finished stage was trained again")

  monkeypatch.setattr(train.Trainer, "run", no_training)
  monkeypatch.setattr(train.Trainer, "predict", no_training)
  monkeypatch.setattr(checkpoints, "save", no_training)  # t-SNE included: nothing recomputed
  again = pipeline.train_and_evaluate(tiny_config(), workdir)
  assert again == results


def test_failed_run_keeps_earlier_results(run, monkeypatch):
  workdir, _ = run
  before = {f: open(os.path.join(workdir, f), "rb").read() for f in ("results.json", "results.md")}
  c = tiny_config()
  c.seed = 7
  with pytest.raises(ValueError, match=r"checkpoints/original was computed with seed=42, this run has 7"):
    pipeline.train_and_evaluate(c, workdir)

  def broken(*a, **k):
    raise RuntimeError("disk full")

  monkeypatch.setattr(report, "tsne_figure", broken)
  with pytest.raises(RuntimeError, match="disk full"):
    pipeline.train_and_evaluate(tiny_config(), workdir)
  for f, data in before.items():
    assert open(os.path.join(workdir, f), "rb").read() == data


def test_changed_method_setting_names_the_field_and_folder(run):
  workdir, _ = run
  c = tiny_config()
  c.finetune.learning_rate = 0.5
  with pytest.raises(ValueError) as e:
    pipeline.train_and_evaluate(c, workdir)
  msg = str(e.value)
  assert "checkpoints/finetune was computed with finetune.learning_rate=0.0001, this run has 0.5" in msg
  assert "delete" in msg and "\n" not in msg


def test_new_method_reuses_original_and_gold(run, tmp_path, monkeypatch):
  workdir, results = run
  import shutil
  wd = str(tmp_path / "copy")
  shutil.copytree(workdir, wd)
  real_run = train.Trainer.run
  trained = []

  def run_spy(self, params, recipe, rng, desc, **kw):
    trained.append(desc)
    return real_run(self, params, recipe, rng, desc, **kw)

  monkeypatch.setattr(train.Trainer, "run", run_spy)
  c = tiny_config()
  c.methods = "delete,two_stage"
  c.delete.epochs = 1
  out = pipeline.train_and_evaluate(c, wd)
  assert trained == ["delete"]  # Original, Gold and two-stage come from the workdir
  assert out["models"]["two_stage"] == results["models"]["two_stage"]


def test_a_method_gives_the_same_result_in_any_method_list(run, tmp_path):
  _, results = run
  c = tiny_config()
  c.methods = "two_stage"
  c.tsne.num_forget = c.tsne.num_retain = 0
  alone = pipeline.train_and_evaluate(c, str(tmp_path))
  keep = lambda r: {k: v for k, v in r.items() if "seconds" not in k and k != "rte"}  # timings
  assert keep(alone["models"]["two_stage"]) == keep(results["models"]["two_stage"])


@pytest.mark.parametrize("field, value, message", [
    ("methods", "finetune,forget_everything", "config.methods: unknown method 'forget_everything'; allowed: finetune, gradient_ascent, two_stage, random_labels"),
    ("methods", "finetune,finetune", "config.methods: lists 'finetune' twice"),
    ("methods", ",", "config.methods: has an empty item"),
    ("forget_class", "10", "config.forget_class: 10 is out of range; allowed: 0..9"),
    ("forget_class", "2,-1", "config.forget_class: -1 is out of range"),
    ("forget_class", "two", "config.forget_class: must be class numbers"),
    ("forget_class", "0,1,2,3,4,5,6,7,8,9", "config.forget_class: forgets every class"),
    ("scenario", "sub", "config.scenario: unknown value 'sub'; allowed: class, random, subclass"),
    ("seed", -3, "config.seed: must be an integer >= 0"),
    ("seed", 2 ** 40, "config.seed: must be below 2**31"),
    ("seeds", "1,x", "config.seeds: must be comma-separated integers"),
    ("seeds", "0", "config.seeds: must name distinct seeds"),
    ("seeds", "1,1", "config.seeds: lists '1' twice"),
    ("batch_size", 0, "config.batch_size: must be an integer >= 1"),
    ("train.epochs", -2, "config.train.epochs: must be an integer >= 1"),
    ("finetune.epochs", 0, "config.finetune.epochs: must be an integer >= 1"),
    ("data.name", "no such", "config.data.name: 'no such' is not a data set name"),
    ("model.vit.variant", "Ti/32", "config.model.vit.variant: unknown variant"),
    ("train.learning_rate", 0.0, "config.train.learning_rate: must be a finite number in (0, inf)"),
    ("train.learning_rate", float("inf"), "config.train.learning_rate: must be a finite number"),
    ("train.momentum", 1.0, "config.train.momentum: must be a finite number in [0, 1)"),
    ("two_stage.temperature", -1.0, "config.two_stage.temperature: must be a finite number in (0, inf)"),
    ("compilation_cache", None, 'config.compilation_cache: must be a folder path or "" (off)'),
])
def test_bad_config_fails_before_any_work(tmp_path, field, value, message):
  c = tiny_config()
  section, _, name = field.rpartition(".")
  (c[section] if section else c)[name] = value
  workdir = tmp_path / "w"
  with pytest.raises(ValueError) as e:
    pipeline.train_and_evaluate(c, str(workdir))
  assert message in str(e.value) and "\n" not in str(e.value)
  assert not workdir.exists()


@pytest.mark.parametrize("method", ["salun", "scrub", "ssd", "fcs"])
def test_method_settings_are_validated(tmp_path, method):
  c = tiny_config()
  c.methods = method
  field = {"salun": "mask_fraction", "scrub": "temperature", "ssd": "alpha", "fcs": "temperature"}[method]
  c[method][field] = -1.0
  with pytest.raises(ValueError, match=f"config.{method}.{field}: must be a finite number"):
    pipeline.train_and_evaluate(c, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_runs_without_tsne(tmp_path):
  c = tiny_config()
  c.train.epochs, c.methods = 1, "gradient_ascent"
  c.tsne.num_forget = c.tsne.num_retain = 0
  results = pipeline.train_and_evaluate(c, str(tmp_path))
  assert set(results["models"]) == {"original", "retrain", "gradient_ascent"}
  assert not (tmp_path / "tsne.png").exists()


def test_unwritable_workdir(tmp_path):
  (tmp_path / "file").write_text("")
  with pytest.raises(ValueError, match="--workdir: cannot write to"):
    pipeline.train_and_evaluate(tiny_config(), str(tmp_path / "file" / "run"))


@pytest.mark.parametrize("name", ["digits", "digits_methods", "cifar10_vit_tiny", "digits_resnet",
                                  "cifar10_resnet18"])
def test_configs_validate_and_are_locked(name):
  c = load_config(name)
  config_lib.validate(c)
  c.lock()
  with pytest.raises(AttributeError):
    c.forget_clas = 1  # a typo in an override must fail, not add a field


def test_cli_override_and_one_line_error(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "jaxunlearn.main", "--config", os.path.join(ROOT, "configs/digits.py"),
       "--workdir", str(tmp_path / "w"), "--config.forget_class=12"],
      capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert out.returncode != 0
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("error: config.forget_class: 12 is out of range; allowed: 0..9"), out.stderr


def test_concurrent_stages_match_sequential(run, tmp_path):
  workdir, concurrent = run
  assert pipeline._workers(tiny_config()) > 1  # the fixture's run had tasks in parallel (CI: 2 cores)
  c = tiny_config()
  c.concurrent_stages = False
  sequential = pipeline.train_and_evaluate(c, str(tmp_path))
  for m in MODELS:
    a, b = concurrent["models"][m], sequential["models"][m]
    timing = lambda k: "seconds" in k or k == "rte"
    assert {k: v for k, v in a.items() if not timing(k)} == {
        k: v for k, v in b.items() if not timing(k)}, m
    pa = checkpoints.restore(os.path.join(workdir, "checkpoints", m))[0]
    pb = checkpoints.restore(str(tmp_path / "checkpoints" / m))[0]
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
      np.testing.assert_array_equal(x, y)


def test_failing_stage_stops_its_concurrent_sibling(tmp_path, monkeypatch):
  real_stage = pipeline._stage

  def stage(trainer, workdir, abstract, name, *args, **kwargs):
    if name == "retrain":
      raise ValueError("gold failed")
    trainer.cancel.wait(timeout=60)  # make sure the failure comes first
    return real_stage(trainer, workdir, abstract, name, *args, **kwargs)

  monkeypatch.setattr(pipeline, "_stage", stage)
  with pytest.raises(ValueError, match="gold failed"):
    pipeline.train_and_evaluate(tiny_config(), str(tmp_path))
  assert not (tmp_path / "checkpoints" / "original").exists()  # cancelled, nothing half-saved


def _task(fn, deps=(), priority=0.0):
  return scheduler.Task(fn, deps, priority)


def test_tasks_run_after_their_deps_highest_priority_first():
  order = []
  record = lambda name: _task(lambda results, idle: order.append(name) or (name, sorted(results)))
  tasks = {"c": record("c"), "a": record("a"), "b": record("b")}
  tasks["c"] = _task(tasks["c"].fn, deps=("a",), priority=9)  # high, but must wait for a
  tasks["a"] = _task(tasks["a"].fn, priority=1)
  tasks["b"] = _task(tasks["b"].fn, priority=5)
  out = scheduler.run_tasks(tasks, 1, threading.Event())
  assert order == ["b", "a", "c"]
  assert out == {"b": ("b", []), "a": ("a", ["b"]), "c": ("c", ["a", "b"])}


def test_tasks_run_at_once_on_several_workers():
  b_started = threading.Event()
  tasks = {"a": _task(lambda r, idle: b_started.wait(10) and idle),  # needs b running beside it
           "b": _task(lambda r, idle: b_started.set() or idle)}
  assert scheduler.run_tasks(tasks, 2, threading.Event()) == {"a": 1, "b": 0}


def test_failing_task_cancels_the_others_and_raises():
  cancel = threading.Event()

  def fail(results, idle):
    raise ValueError("boom")

  tasks = {"slow": _task(lambda r, idle: cancel.wait(10)), "fail": _task(fail),
           "after": _task(lambda r, idle: pytest.fail("ran after a failure"), deps=("fail",))}
  with pytest.raises(ValueError, match="boom"):
    scheduler.run_tasks(tasks, 2, cancel)
  assert cancel.is_set()
  with pytest.raises(ValueError, match="wait on tasks that do not exist"):
    scheduler.run_tasks({"a": _task(lambda r, idle: 1, deps=("x",))}, 2, threading.Event())


def test_progress_bars_take_the_lowest_free_line():
  slots = scheduler.BarSlots()
  with slots.take() as a, slots.take() as b:
    assert (a, b) == (0, 1)
    with slots.take() as c:
      assert c == 2
  with slots.take() as a:
    assert a == 0  # freed lines are reused


def test_compilation_cache_is_used_unless_jax_has_one(tmp_path):
  # Under pytest JAX already has a cache dir (conftest): the config's path must not replace it.
  before = jax.config.jax_compilation_cache_dir
  pipeline.use_compilation_cache(str(tmp_path / "ignored"))
  assert jax.config.jax_compilation_cache_dir == before
  # In a fresh process without one, a compile lands in the config's folder.
  script = (
      "import jax, jax.numpy as jnp\n"
      "from jaxunlearn import pipeline\n"
      "from jaxunlearn.models import vit as model\n"
      f"pipeline.use_compilation_cache({str(tmp_path / 'cache')!r})\n"
      "vit = model.ViT(num_classes=10, image_size=8, patch_size=2, hidden_size=64, depth=2,\n"
      "                num_heads=4, mlp_dim=128)\n"
      "model.init_params(vit, jax.random.key(0), 1)\n")
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "XLA_FLAGS")}
  subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT, env=env, timeout=120)
  assert os.listdir(tmp_path / "cache")


def _readme_commands():
  """Every `python -m jaxunlearn.main ...` command in the README, continuation lines joined."""
  import re
  import shlex
  with open(os.path.join(ROOT, "README.md")) as f:
    text = f.read().replace("\\\n", " ")
  return [shlex.split(m.split("&&")[-1].split("#")[0])
          for m in re.findall(r"^.*python -m jaxunlearn\.main .*$", text, flags=re.M)]


@pytest.mark.parametrize("argv", _readme_commands(), ids=lambda a: " ".join(a[3:])[:60])
def test_readme_commands_parse_and_validate(argv):
  # As written in the README, plus --check_config (parse and validate, no run).
  out = subprocess.run([sys.executable, *argv[1:], "--check_config"], capture_output=True,
                       text=True, cwd=ROOT, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "config ok" in out.stdout


def test_cli_runs_a_comma_separated_method_list(tmp_path):
  workdir = tmp_path / "w"
  out = subprocess.run(
      [sys.executable, "-m", "jaxunlearn.main", "--config", os.path.join(ROOT, "configs/digits.py"),
       "--workdir", str(workdir), "--config.methods=two_stage,ssd",
       "--config.model.vit.patch_size=4", "--config.model.vit.hidden_size=16", "--config.model.vit.depth=1",
       "--config.model.vit.num_heads=2", "--config.model.vit.mlp_dim=32", "--config.train.epochs=2",
       "--config.two_stage.epochs=1", "--config.tsne.num_forget=0", "--config.tsne.num_retain=0",
       "--config.progress=false"],
      capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  with open(workdir / "results.json") as f:
    assert list(json.load(f)["models"]) == ["original", "retrain", "two_stage", "ssd"]


def _small(c, methods):
  c.methods, c.train.epochs = methods, 3
  c.tsne.num_forget = c.tsne.num_retain = 0
  return c


def test_random_subset_scenario(tmp_path):
  from jaxunlearn import datasets, evaluate, scenario
  c = _small(tiny_config(), "gradient_ascent")
  c.scenario, c.forget_fraction = "random", 0.1
  data = datasets.load(c.data)
  scene = scenario.from_config(c, data)
  n_forget = scene.forget_train.sum()
  assert n_forget == pytest.approx(0.1 * len(data.train_labels), abs=1)
  for k in range(10):  # stratified: every class loses about a tenth
    in_class = data.train_labels == k
    assert abs(scene.forget_train[in_class].mean() - 0.1) < 0.02
  assert not scene.forget_test.any()
  again = scenario.from_config(c, data)
  np.testing.assert_array_equal(again.forget_train, scene.forget_train)  # seeded
  c2 = c.copy_and_resolve_references()
  c2.seed = 1
  assert not np.array_equal(scenario.from_config(c2, data).forget_train, scene.forget_train)
  np.testing.assert_array_equal(scene.pools()["retain"], np.flatnonzero(~scene.forget_train))
  out = pipeline.train_and_evaluate(c, str(tmp_path))
  for m, r in out["models"].items():
    assert not set(evaluate.FORGET_TEST_METRICS) & set(r), m  # omitted, not faked
    assert np.isfinite(r["mia_efficacy"]) and np.isfinite(r["loss_mia"])
  assert out["models"]["retrain"]["tow"] == 1.0


def test_several_forget_classes(tmp_path):
  from jaxunlearn import datasets, scenario
  c = tiny_config()
  c.forget_class = "3,0"
  data = datasets.load(c.data)
  scene = scenario.from_config(c, data)
  assert scene.classes == (0, 3)
  np.testing.assert_array_equal(scene.forget_train, np.isin(data.train_labels, (0, 3)))
  np.testing.assert_array_equal(scene.forget_test, np.isin(data.test_labels, (0, 3)))


def test_seeds_run_into_subfolders_and_a_finished_seed_is_reused(tmp_path, monkeypatch):
  c = _small(tiny_config(), "gradient_ascent")
  c.seeds = "0,1"
  out = pipeline.train_and_evaluate(c, str(tmp_path))
  with open(tmp_path / "results.json") as f:
    on_disk = json.load(f)
  assert set(on_disk) == {"config", "seeds", "mean", "std", "names"}
  assert set(on_disk["seeds"]) == {"0", "1"}
  for m in ("original", "retrain", "gradient_ascent"):
    values = [on_disk["seeds"][s][m]["retain_test_acc"] for s in ("0", "1")]
    assert on_disk["mean"][m]["retain_test_acc"] == pytest.approx(np.mean(values))
    assert on_disk["std"][m]["retain_test_acc"] == pytest.approx(np.std(values, ddof=1))
  for s in (0, 1):
    with open(tmp_path / f"seed_{s}" / "results.json") as f:
      assert json.load(f)["config"]["seed"] == s
  assert (tmp_path / "tradeoff.png").exists() and (tmp_path / "seed_0" / "loss_curves.png").exists()
  md = (tmp_path / "results.md").read_text()
  assert "Mean ± sd over 2 seeds" in md and "## Seed 0" in md and "## Seed 1" in md
  trained = []
  real_run = train.Trainer.run
  monkeypatch.setattr(train.Trainer, "run", lambda self, p, r, rng, desc, **kw: (
      trained.append(desc), real_run(self, p, r, rng, desc, **kw))[1])
  c.seeds = "3"  # a count: seeds 0, 1, 2
  again = pipeline.train_and_evaluate(c, str(tmp_path))
  assert trained == ["original", "retrain", "gradient_ascent"] or sorted(trained) == sorted(
      ["original", "retrain", "gradient_ascent"])  # only seed 2 trains
  assert again["seeds"][0] == out["seeds"][0]
