"""How a run stops: one `error:` line and a documented status for every expected failure
(Ctrl-C, a lost workdir lock, a full disk, a damaged checkpoint), configs too large for
the machine refused before any work, and the workdir lock. Exit-time noise is only seen
from a real process, so the command-line cases run one and count stderr's lines."""
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from jaxunlearn import exits, fields, lock, main, sizes, workdir
from tests.test_cli import argv, input_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A small run that trains long enough to be stopped mid-stage.
SMALL = ["--config.model.vit.hidden_size=16", "--config.model.vit.depth=1",
         "--config.model.vit.num_heads=2", "--config.model.vit.mlp_dim=32",
         "--config.model.vit.patch_size=4", "--config.methods=gradient_ascent",
         "--config.progress=false", "--config.tsne.num_retain=0", "--config.tsne.num_forget=0",
         "--config.checkpoint_every_chunks=1", "--config.compilation_cache="]


def start(workdir, *args, python=("-m", "jaxunlearn.main")):
  return subprocess.Popen([sys.executable, *python, *argv(*SMALL, *args, workdir=str(workdir))[1:]],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path, p, timeout=180):
  t0 = time.time()
  while not os.path.exists(path):
    assert p.poll() is None and time.time() - t0 < timeout, p.communicate()
    time.sleep(0.2)


def stderr_lines(p) -> tuple[int, list[str]]:
  _, err = p.communicate(timeout=300)
  return p.returncode, err.strip().splitlines()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "lock deleted", "workdir deleted"])
def test_a_stopped_run_says_one_line(tmp_path, how):
  wd = tmp_path / "w"
  p = start(wd, "--config.train.epochs=400")
  wait_for(wd / "checkpoints", p)
  time.sleep(1)
  if how.startswith("SIG"):
    p.send_signal(getattr(signal, how))
  elif how == "lock deleted":
    os.remove(wd / ".lock")
  else:
    subprocess.run(["rm", "-rf", str(wd)], check=True)
  code, lines = stderr_lines(p)
  if how.startswith("SIG"):
    assert (code, lines) == (128 + getattr(signal, how),
                             ["interrupted; rerun the same command to resume"])
  else:
    assert code == exits.EXIT_ENVIRONMENT and len(lines) == 1, lines
    assert lines[0].startswith(f"error: {wd}/.lock was deleted or replaced"), lines


FULL_DISK = """
import errno, sys
import orbax.checkpoint as ocp
def no_space(*a, **k):
  raise OSError(errno.ENOSPC, "No space left on device")
ocp.CheckpointManager.save = no_space
from jaxunlearn import main
sys.argv[0] = "jaxunlearn.main"
main.run()
"""


@pytest.mark.slow
def test_a_full_disk_is_one_line_with_the_environment_status(tmp_path):
  p = start(tmp_path / "w", python=("-c", FULL_DISK))
  code, lines = stderr_lines(p)
  assert code == exits.EXIT_ENVIRONMENT and len(lines) == 1, lines
  assert "No space left on device" in lines[0] and "cannot write" in lines[0]


@pytest.mark.slow
def test_a_second_run_is_refused_before_jax_loads(tmp_path):
  wd = tmp_path / "w"
  first = start(wd, "--config.train.epochs=400")
  try:
    wait_for(wd / ".lock", first)
    time.sleep(0.5)
    t0 = time.perf_counter()
    second = start(wd)
    code, lines = stderr_lines(second)
    assert time.perf_counter() - t0 < 3  # JAX alone takes longer to import
    assert code == exits.EXIT_INPUT_ERROR and len(lines) == 1
    assert f"is in use by process {first.pid}" in lines[0]
    assert first.poll() is None
  finally:
    first.kill()
    first.communicate()


def test_a_lost_lock_is_noticed(tmp_path):
  lock.acquire(str(tmp_path))
  try:
    assert lock.lost() is None
    lock.check()
    os.remove(tmp_path / ".lock")
    (tmp_path / ".lock").write_text("someone else's")  # another file at the same path
    with pytest.raises(workdir.WorkdirError, match=r"\.lock was deleted or replaced"):
      workdir.check_lock()
  finally:
    lock.release(str(tmp_path))
  assert lock.lost() is None  # released: no longer watched


def test_the_lock_file_as_a_folder_names_the_fix(tmp_path):
  os.makedirs(tmp_path / ".lock")
  with pytest.raises(workdir.WorkdirError) as e:
    lock.acquire(str(tmp_path))
  assert str(e.value) == (f"{tmp_path}/.lock is a folder, not a lock file; remove it "
                          f"(rm -r '{tmp_path}/.lock') and rerun")
  assert exits.status(e.value) == exits.EXIT_ENVIRONMENT


def test_the_write_probe_is_unique_and_leaves_nothing(tmp_path, monkeypatch):
  made = []
  real = workdir.tempfile.mkstemp
  monkeypatch.setattr(workdir.tempfile, "mkstemp",
                      lambda **k: made.append(real(**k)[1]) or (os.open(made[-1], os.O_RDONLY), made[-1]))
  workdir._check_writable(str(tmp_path))
  workdir._check_writable(str(tmp_path))
  assert len(set(made)) == 2 and all(os.path.basename(m).startswith(".write_test-") for m in made)
  assert os.listdir(tmp_path) == []


def test_disk_errors_name_the_path_and_the_fix(tmp_path, monkeypatch):
  def full(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(workdir.os, "replace", full)
  with pytest.raises(workdir.WorkdirError) as e:
    workdir.atomic_write(str(tmp_path / "results.json"), "{}")
  assert str(e.value) == (f"cannot write {tmp_path}/results.json (No space left on device); free "
                          "space on that disk, then rerun the same command to resume")
  assert os.listdir(tmp_path) == []  # the temporary file is gone too
  raw = OSError(errno.ENOSPC, "No space left on device", "/w/x")
  assert exits.status(raw) == exits.EXIT_ENVIRONMENT
  assert exits.message(raw) == ("No space left on device: /w/x; free space on that disk, then "
                                "rerun the same command to resume")
  assert exits.status(ValueError("config.seed: ...")) == exits.EXIT_INPUT_ERROR


def test_a_finished_read_only_workdir_prints_its_report(tmp_path, monkeypatch):
  config, _ = main.check(argv())
  from jaxunlearn import report
  finished = {"config": json.loads(config.to_json())}
  monkeypatch.setattr(report, "read", lambda wd: (finished, "# Unlearning results\n"))
  monkeypatch.setattr(main.os, "access", lambda path, mode: False)
  assert main.finished_report(config, str(tmp_path)) == "# Unlearning results\n"
  config.seed += 1  # another config: the run goes on (and says why it cannot write)
  assert main.finished_report(config, str(tmp_path)) is None


# The probe's oversized configs: each refused before any work, naming its field.
TOO_LARGE = [
    ("data.synthetic.num_train=2147483647", "data.synthetic.num_train"),
    ("data.synthetic.image_size=100000", "data.synthetic.image_size"),
    ("data.image_size=100000", "data.image_size"),
    ("steps_per_chunk=2147483647", "steps_per_chunk"),
    ("model.vit.hidden_size=1048576", "model.vit.hidden_size"),
    ("model.vit.mlp_dim=1073741824", "model.vit.mlp_dim"),
    ("batch_size=1000000", "batch_size"),
    ("eval.batch_size=2147483647", "eval.batch_size"),
    ("model.vit.depth=100000", "model.vit.depth"),
]
GIB = 2 ** 30


@pytest.mark.parametrize("override,field", TOO_LARGE)
def test_a_config_too_large_is_refused_naming_its_field(override, field):
  data = ["--config.data.name=synthetic"] if override.startswith("data.synthetic") else []
  config, _ = main.check(argv(*data, f"--config.{override}"))
  with pytest.raises(ValueError) as e:
    sizes.check(config, devices=[None], have=16 * GIB)
  message = str(e.value)
  assert message.startswith(f"config.{field}: ") and "\n" not in message, message
  largest = int(message.rsplit("at most ", 1)[1].split()[0].replace(",", ""))
  value = int(override.split("=")[1])
  assert 0 < largest < value  # the limit: the largest value that fits
  smaller = sizes._with(config, field, largest)
  sizes.check(smaller, devices=[None], have=16 * GIB)  # fits at the limit


def test_the_default_configs_fit_a_small_machine():
  for name in ("digits", "digits_methods", "digits_resnet"):
    config, _ = main.check(argv(config=os.path.join(ROOT, "configs", f"{name}.py")))
    sizes.check(config, devices=[None], have=GIB)


@pytest.mark.parametrize("override,field", [("train.epochs=2147483647", "train.epochs"),
                                            ("gradient_ascent.epochs=1000000000", "gradient_ascent.epochs")])
def test_too_many_steps_are_refused(override, field):
  config, _ = main.check(argv(f"--config.{override}"))
  with pytest.raises(ValueError, match=rf"^config\.{field}: .* exceed the int32 step counter; at most"):
    sizes.check_steps(config, sizes.num_train(config))


@pytest.mark.parametrize("override,message", [
    ("seeds=0,,1", "config.seeds: has an empty item in '0,,1'"),
    ("seeds=3,", "config.seeds: has an empty item in '3,'"),
    ("seeds=,", "config.seeds: has an empty item in ','"),
    ("forget_class=0,,1", "config.forget_class: has an empty item"),
    ("forget_class=0,0", "config.forget_class: lists '0' twice"),
    ("forget_class=0,00", "config.forget_class: lists a class twice"),
    ("methods=finetune,,two_stage", "config.methods: has an empty item"),
    ("tune.methods=finetune,,scrub", "config.tune.methods: has an empty item"),
    ("tune.methods=scrub,scrub", "config.tune.methods: lists 'scrub' twice"),
])
def test_malformed_lists_are_refused(override, message):
  assert input_error(f"--config.{override}").startswith(message)


def test_scikit_learn_split_errors_name_our_field():
  from jaxunlearn import datasets, scenario
  config, _ = main.check(argv("--config.data.test_size=0.999"))
  with pytest.raises(ValueError, match=r"^config\.data\.test_size: 0\.999 cannot be used; "
                                       r"scikit-learn's .*train_size = 1"):
    datasets.load(config.data)
  config, _ = main.check(argv("--config.scenario=random", "--config.forget_fraction=0.00001"))
  with pytest.raises(ValueError, match=r"^config\.forget_fraction: 1e-05 cannot be used; .*"
                                       r"\(its test part is the forget set\)$"):
    scenario.from_config(config, datasets.load(config.data))


def test_a_config_file_calling_sys_exit_is_named(tmp_path):
  path = tmp_path / "exits.py"
  path.write_text(textwrap.dedent("""
      import sys
      sys.exit(3)
  """))
  assert input_error(config=str(path)) == f"--config: {path} called sys.exit(3) while loading"


def test_listed_keeps_well_formed_lists():
  c = {"a": "x, y,z", "b": ""}
  assert fields.listed(c, "a") == ("x", "y", "z") and fields.listed(c, "b") == ()
