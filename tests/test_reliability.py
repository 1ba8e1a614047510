"""Nothing lost, nothing wrong: resume inside a stage (with any chunk size), one writer per
workdir, damaged files, a stage's folder read back as another stage, divergence and
saturation, a full disk, results files of a stopped write, determinism. (Multi-host:
tests/test_multihost.py; bad input: tests/test_cli.py.)"""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from jaxunlearn import checkpoints, pipeline, report, train, workdir as workdir_lib
from tests.test_pipeline import ROOT, tiny_config

TIMING = ("seconds", "compile_seconds", "rte")


def small_config(**overrides):
  c = tiny_config()
  c.methods = "gradient_ascent,two_stage"
  c.train.epochs = 6
  c.steps_per_chunk = 5
  c.checkpoint_every_chunks, c.checkpoint_every_seconds = 2, 0.0
  c.tsne.num_forget, c.tsne.num_retain = 10, 20
  for k, v in overrides.items():
    section, _, name = k.rpartition(".")
    (c[section] if section else c)[name] = v
  return c


def without_timing(results: dict) -> dict:
  return {m: {k: v for k, v in r.items() if k not in TIMING} for m, r in results["models"].items()}


def read_results(workdir) -> dict:
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("reference"))
  pipeline.train_and_evaluate(small_config(), workdir)
  return workdir


class Crash(Exception):
  pass


def test_same_config_twice_gives_identical_results(reference, tmp_path):
  pipeline.train_and_evaluate(small_config(), str(tmp_path))
  assert without_timing(read_results(tmp_path)) == without_timing(read_results(reference))


def test_a_crash_inside_a_stage_resumes_from_its_last_snapshot(reference, tmp_path, monkeypatch):
  real_save = checkpoints.Snapshots.save
  saved = []

  def save_then_crash(self, position, arrays, log):
    real_save(self, position, arrays, log)
    saved.append((self.path, position, len(log["loss"])))
    if self.path.endswith("original.partial") and len(saved) >= 3:
      raise Crash("killed")

  monkeypatch.setattr(checkpoints.Snapshots, "save", save_then_crash)
  with pytest.raises(Crash):
    pipeline.train_and_evaluate(small_config(), str(tmp_path))
  assert (tmp_path / "checkpoints" / "original.partial").is_dir()
  monkeypatch.setattr(checkpoints.Snapshots, "save", real_save)
  resumed_at = []
  real_run = train.Trainer.run

  def spy(self, params, recipe, rng, desc, bar_position=0, *, snapshots=None, resume=None):
    resumed_at.append((desc, None if resume is None else len(resume["loss"])))
    return real_run(self, params, recipe, rng, desc, bar_position, snapshots=snapshots, resume=resume)

  monkeypatch.setattr(train.Trainer, "run", spy)
  pipeline.train_and_evaluate(small_config(), str(tmp_path))
  original_steps = [n for p, pos, n in saved if p.endswith("original.partial")][-1]
  assert ("original", original_steps) in resumed_at  # not from its beginning
  assert without_timing(read_results(tmp_path)) == without_timing(read_results(reference))
  assert not list((tmp_path / "checkpoints").glob("*.partial"))  # deleted once final


def test_a_crash_resumes_with_another_steps_per_chunk(reference, tmp_path, monkeypatch):
  """Snapshots record the step, not the chunk: 7-step chunks resume a run of 5-step ones."""
  real_save = checkpoints.Snapshots.save
  saved = []

  def save_then_crash(self, position, arrays, log):
    real_save(self, position, arrays, log)
    if self.path.endswith("original.partial"):
      saved.append(len(log["loss"]))
      if len(saved) == 2:
        raise Crash("killed")

  monkeypatch.setattr(checkpoints.Snapshots, "save", save_then_crash)
  with pytest.raises(Crash):
    pipeline.train_and_evaluate(small_config(), str(tmp_path))
  assert saved[-1] % 7  # the resumed run's chunks start at a step no multiple of 7
  monkeypatch.setattr(checkpoints.Snapshots, "save", real_save)
  resumed_at = []
  real_run = train.Trainer.run

  def spy(self, params, recipe, rng, desc, bar_position=0, *, snapshots=None, resume=None):
    resumed_at.append((desc, self.steps_per_chunk, None if resume is None else len(resume["loss"])))
    return real_run(self, params, recipe, rng, desc, bar_position, snapshots=snapshots, resume=resume)

  monkeypatch.setattr(train.Trainer, "run", spy)
  pipeline.train_and_evaluate(small_config(steps_per_chunk=7), str(tmp_path))
  assert ("original", 7, saved[-1]) in resumed_at
  assert without_timing(read_results(tmp_path)) == without_timing(read_results(reference))
  for m in ("original", "retrain", "gradient_ascent", "two_stage"):
    want = checkpoints.read_record(os.path.join(reference, "checkpoints", m))["loss"]
    assert checkpoints.read_record(str(tmp_path / "checkpoints" / m))["loss"] == want, m


def test_snapshots_cost_little_and_keep_only_the_latest(tmp_path, monkeypatch):
  c = small_config()
  real_save = checkpoints.Snapshots.save
  steps = []
  monkeypatch.setattr(checkpoints.Snapshots, "save", lambda self, pos, arrays, log: (
      steps.append(os.listdir(self.path) if os.path.isdir(self.path) else []),
      real_save(self, pos, arrays, log))[1])
  pipeline.train_and_evaluate(c, str(tmp_path))
  assert len(steps) > 3 and all(len(s) <= 1 for s in steps)  # preservation policy: latest only


def _holder(workdir):
  script = textwrap.dedent(f"""
      import fcntl, os, sys, time
      fd = os.open({os.path.join(workdir, '.lock')!r}, os.O_RDWR | os.O_CREAT)
      fcntl.flock(fd, fcntl.LOCK_EX)
      os.pwrite(fd, b"process %d on testhost" % os.getpid(), 0)
      print("locked", flush=True)
      time.sleep(120)
  """)
  p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
  assert p.stdout.readline().strip() == "locked"
  return p


def test_a_second_run_on_a_workdir_in_use_stops_at_once(tmp_path):
  os.makedirs(tmp_path / "w")
  holder = _holder(str(tmp_path / "w"))
  try:
    t0 = time.perf_counter()
    with pytest.raises(ValueError) as e:
      pipeline.train_and_evaluate(small_config(), str(tmp_path / "w"))
    assert time.perf_counter() - t0 < 30
    assert f"is in use by process {holder.pid} on testhost" in str(e.value)
    assert "\n" not in str(e.value)
    assert holder.poll() is None  # the first run is unaffected
    assert not (tmp_path / "w" / "checkpoints").exists()
  finally:
    holder.kill()
    holder.wait()
  # The OS released the killed holder's lock: the next run goes ahead.
  c = small_config(methods="gradient_ascent", **{"tsne.num_forget": 0, "tsne.num_retain": 0})
  pipeline.train_and_evaluate(c, str(tmp_path / "w"))


def _damage_cases():
  def array_file(wd):
    return sorted((wd / "checkpoints" / "original").glob("*/params/**/d/*"), key=lambda p: -p.stat().st_size)[0]

  def truncate(wd):
    f = array_file(wd)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])

  def flip(wd):
    f = array_file(wd)
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 0x40
    f.write_bytes(bytes(b))

  def delete(wd):
    array_file(wd).unlink()

  def overwrite(wd):
    f = array_file(wd)
    f.write_bytes(b"\0" * f.stat().st_size)

  def edit_record(wd):
    (f,) = (wd / "eval" / "two_stage").glob("*/record/metadata")
    record = json.loads(f.read_text())
    record["metrics"]["forget_train_acc"] = 0.0
    f.write_text(json.dumps(record))

  def config_json(wd):
    (wd / "config.json").write_text('{"seed": 4')

  return {"truncated": (truncate, "checkpoints/original"), "flipped byte": (flip, "checkpoints/original"),
          "deleted file": (delete, "checkpoints/original"), "overwritten": (overwrite, "checkpoints/original"),
          "edited record": (edit_record, "eval/two_stage"), "config.json": (config_json, "config.json")}


@pytest.mark.parametrize("kind", list(_damage_cases()))
def test_damaged_files_stop_the_run_with_one_line(reference, tmp_path, kind):
  damage, where = _damage_cases()[kind]
  wd = tmp_path / "w"
  shutil.copytree(reference, wd)
  damage(wd)
  before = (wd / "results.json").read_bytes()
  with pytest.raises(ValueError) as e:
    pipeline.train_and_evaluate(small_config(), str(wd))
  msg = str(e.value)
  assert "\n" not in msg and where in msg and "delete" in msg, msg
  assert (wd / "results.json").read_bytes() == before  # no wrong table


def test_a_stage_folder_is_read_back_only_as_that_stage(reference, tmp_path):
  """Original and Gold share their config section: their inputs name the stage and its pool."""
  wd = tmp_path / "w"
  shutil.copytree(reference, wd)
  shutil.rmtree(wd / "checkpoints" / "retrain")
  shutil.copytree(wd / "checkpoints" / "original", wd / "checkpoints" / "retrain")
  before = (wd / "results.json").read_bytes()
  with pytest.raises(ValueError) as e:
    pipeline.train_and_evaluate(small_config(), str(wd))
  msg = str(e.value)
  assert "\n" not in msg, msg
  assert msg.startswith(f"{wd}/checkpoints/retrain was computed with stage='original', this run "
                        "has 'retrain' (2 field(s) differ)"), msg
  assert (wd / "results.json").read_bytes() == before
  original = checkpoints.read_record(str(wd / "checkpoints" / "original"))["inputs"]
  assert (original["stage"], original["pool"]) == ("original", ["all"])
  older = {k: v for k, v in original.items() if k not in ("stage", "pool")}  # before issue 18
  with pytest.raises(ValueError, match=r"^x records no stage name \(written by an older"):
    workdir_lib.check_inputs("x", older, original)


def test_a_diverging_method_is_reported_and_the_others_finish(tmp_path):
  c = small_config(methods="gradient_ascent,finetune", **{"tsne.num_forget": 0, "tsne.num_retain": 0})
  c.gradient_ascent.learning_rate, c.gradient_ascent.epochs = 1e6, 3
  out = pipeline.train_and_evaluate(c, str(tmp_path))
  ga = out["models"]["gradient_ascent"]
  assert ga["diverged_step"] >= 0 and "forget_train_acc" not in ga
  assert np.isfinite(out["models"]["finetune"]["forget_train_acc"])
  md = (tmp_path / "results.md").read_text()
  assert "Diverged at step" in md
  row = [l for l in md.splitlines() if l.startswith("| Gradient Ascent |")][0]
  assert f"| {ga['diverged_step']} |" in row


def _rows(markdown: str, model: str) -> list[str]:
  return [line for line in markdown.splitlines() if line.startswith(f"| {model} |")]


def test_a_saturated_method_is_marked_in_results_and_every_table(reference, tmp_path):
  """Gradient ascent at lr 100 predicts one class for everything after a step, with a loss of
  -0.0 from then on: finite, so no divergence, but no result either."""
  wd = tmp_path / "w"
  shutil.copytree(reference, wd)  # Original and Gold as they are; gradient ascent anew
  for kind in ("checkpoints", "eval", "tsne"):
    shutil.rmtree(wd / kind / "gradient_ascent")
  c = small_config()
  c.gradient_ascent.learning_rate, c.gradient_ascent.epochs = 100.0, 10
  out = pipeline.train_and_evaluate(c, str(wd))
  ga = out["models"]["gradient_ascent"]
  assert ga["saturated_class"] in range(10) and ga["saturated_step"] <= 2, ga
  assert np.isfinite(ga["forget_train_acc"]) and "diverged_step" not in ga  # still reported
  for m in ("original", "retrain", "two_stage"):
    assert not {"saturated_class", "saturated_step"} & set(out["models"][m]), m
  assert read_results(wd)["models"]["gradient_ascent"] == ga
  mark = f"| class {ga['saturated_class']}; loss flat from step {ga['saturated_step']} |"
  md = (wd / "results.md").read_text()
  assert md.count("| Saturated |") == 2  # the study's table and the field's
  assert [mark in row for row in _rows(md, "Gradient Ascent")] == [True, True]
  assert not any(mark in row for row in _rows(md, "2-Stage") + _rows(md, "Original"))
  csv_rows = (wd / "results.csv").read_text().splitlines()
  assert csv_rows[0].endswith(",saturated_class,saturated_step")
  assert [r for r in csv_rows if r.startswith("gradient_ascent,")][0].endswith(
      f",{ga['saturated_class']},{ga['saturated_step']}")


def test_the_mean_over_seeds_marks_diverged_and_saturated_models(tmp_path):
  names = {"original": "Original", "retrain": "Gold (retrain)",
           "gradient_ascent": "Gradient Ascent", "neggrad_plus": "NegGrad+"}
  ok = {"forget_train_acc": 90.0, "retain_test_acc": 80.0, "mia_efficacy": 10.0, "seconds": 1.0}
  per_seed = {s: {"original": ok, "retrain": ok, "gradient_ascent": dict(ok),
                  "neggrad_plus": dict(ok)} for s in (0, 1, 2)}
  per_seed[1]["neggrad_plus"] = {"diverged_step": 7, "diverged_phase": "ascent", "seconds": 1.0}
  for s in (0, 2):
    per_seed[s]["gradient_ascent"].update(saturated_class=3, saturated_step=4)
  summary = report.write_seeds(str(tmp_path), {}, per_seed, names, {})
  study, field = summary.split("\n\n| Model |")[1:]
  for table in (study, field):
    header = table.splitlines()[0]
    assert header.endswith("| Diverged (seeds) | Saturated (seeds) |"), header
    assert _rows("| Model |" + table, "NegGrad+")[0].endswith("| 1 | — |")
    assert _rows("| Model |" + table, "Gradient Ascent")[0].endswith("| — | 2 |")
    assert _rows("| Model |" + table, "Original")[0].endswith("| — | — |")
  on_disk = read_results(tmp_path)
  assert on_disk["mean"]["gradient_ascent"]["saturated_seeds"] == 2
  assert "saturated_class" not in on_disk["mean"]["gradient_ascent"]  # a mark, not a metric
  assert on_disk["mean"]["neggrad_plus"]["diverged_seeds"] == 1


def test_a_write_stopped_before_results_json_leaves_results_md_marked_stale(reference, tmp_path,
                                                                           monkeypatch):
  wd = tmp_path / "w"
  shutil.copytree(reference, wd)
  committed, markdown = report.read(str(wd))
  assert markdown is not None and "| 2-Stage |" in markdown
  written = []
  real_write = report.atomic_write

  def write_but_stop_at_results_json(path, data):
    written.append(os.path.basename(path))
    if written[-1] == "results.json":
      raise Crash("killed")
    real_write(path, data)

  monkeypatch.setattr(report, "atomic_write", write_but_stop_at_results_json)
  # Another run in the same workdir (one method: another table), stopped at its last write.
  c = small_config(methods="gradient_ascent")
  with pytest.raises(Crash):
    pipeline.train_and_evaluate(c, str(wd))
  assert written[-1] == "results.json" and "results.md" in written  # results.json comes last
  assert "| 2-Stage |" not in (wd / "results.md").read_text()  # the stopped run's tables...
  assert report.read(str(wd)) == (committed, None)  # ...are told apart from results.json's
  monkeypatch.setattr(report, "atomic_write", real_write)
  out = pipeline.train_and_evaluate(c, str(wd))  # the rerun commits both
  results, markdown = report.read(str(wd))
  assert results == json.loads(json.dumps(out)) and "| Gradient Ascent |" in markdown


def test_a_diverging_original_stops_the_run_with_one_line(tmp_path):
  c = small_config(methods="finetune", **{"train.learning_rate": 1e8})
  # Original and Gold train at once: whichever diverges first stops the run.
  with pytest.raises(ValueError, match=r"^(Original|Gold \(retrain\)) diverged \(train: .* at step "
                                       r"\d+; .*config.train.learning_rate$"):
    pipeline.train_and_evaluate(c, str(tmp_path))


def test_a_full_disk_gives_one_line_and_other_workdirs_keep_their_results(reference, tmp_path, monkeypatch):
  before = {f: open(os.path.join(reference, f), "rb").read() for f in os.listdir(reference)
            if f.startswith("results")}
  import orbax.checkpoint as ocp

  def no_space(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(ocp.CheckpointManager, "save", no_space)
  with pytest.raises(ValueError) as e:
    pipeline.train_and_evaluate(small_config(), str(tmp_path / "w"))
  assert "No space left on device" in str(e.value) and "\n" not in str(e.value)
  assert "cannot write" in str(e.value)
  for f, data in before.items():
    assert open(os.path.join(reference, f), "rb").read() == data


# Each kill point patches one function in a child process so that the process kills
# itself with SIGKILL there; the same run then resumes in this process.
KILL_POINTS = {
    "mid-training": """
        real = checkpoints.Snapshots.save
        def save(self, *a):
          real(self, *a)
          if self.path.endswith("original.partial"):
            os.kill(os.getpid(), signal.SIGKILL)
        checkpoints.Snapshots.save = save""",
    "inside an orbax save": """
        import orbax.checkpoint as ocp
        real = ocp.CheckpointManager.wait_until_finished
        calls = []
        def wait(self):
          calls.append(1)
          if len(calls) == 4:  # a save is in flight: its files are not finalised yet
            os.kill(os.getpid(), signal.SIGKILL)
          return real(self)
        ocp.CheckpointManager.wait_until_finished = wait""",
    "during evaluation": """
        real = pipeline._evaluate
        def evaluate(*a, **k):
          if a[2] == "two_stage":
            os.kill(os.getpid(), signal.SIGKILL)
          return real(*a, **k)
        pipeline._evaluate = evaluate""",
    "during t-SNE": """
        from jaxunlearn import report
        real = report.tsne
        calls = []
        def tsne(*a, **k):
          calls.append(1)
          if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
          return real(*a, **k)
        report.tsne = tsne""",
}


@pytest.mark.slow
@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_kill_9_then_the_same_run_resumes_to_the_same_results(reference, tmp_path, point):
  wd = str(tmp_path / "w")
  script = "\n".join([
      "import os, signal, sys",
      f"sys.path.insert(0, {ROOT!r})",
      "from jaxunlearn import checkpoints, pipeline",
      "from tests.test_reliability import small_config",
      textwrap.dedent(KILL_POINTS[point]),
      f"pipeline.train_and_evaluate(small_config(), {wd!r})",
      "print('finished without being killed')"])
  child = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
  assert child.returncode == -signal.SIGKILL, (child.returncode, child.stderr[-2000:])
  assert not os.path.exists(os.path.join(wd, "results.json"))
  pipeline.train_and_evaluate(small_config(), wd)
  assert without_timing(read_results(wd)) == without_timing(read_results(reference))
  assert not [d for d in os.listdir(os.path.join(wd, "checkpoints")) if d.endswith(".partial")]
