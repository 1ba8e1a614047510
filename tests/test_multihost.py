"""Multi-host runs: two processes on localhost (CPU, gloo) against one process.

Each process is `python -m jaxunlearn.main ... --config.distributed=true` with its
own fake CPU devices; the pytest process (8 fake devices, see conftest) joins no
cluster itself.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import ml_collections
import numpy as np
import pytest

from jaxunlearn import checkpoints, distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ("original", "retrain", "gradient_ascent")
TINY = ["--config.model.vit.patch_size=4", "--config.model.vit.hidden_size=16", "--config.model.vit.depth=1",
        "--config.model.vit.num_heads=2", "--config.model.vit.mlp_dim=32", "--config.train.epochs=2",
        "--config.methods=gradient_ascent", "--config.gradient_ascent.epochs=2",
        "--config.tsne.num_forget=0", "--config.tsne.num_retain=0", "--config.progress=false",
        "--config.batch_size=256"]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def env(devices: int) -> dict:
  """This process's environment, with `devices` fake CPU devices and no cluster settings.

  JAX_COMPILATION_CACHE_DIR (conftest's) stays: later runs compile less.
  """
  out = {k: v for k, v in os.environ.items()
         if k != "XLA_FLAGS" and not k.startswith("JAXUNLEARN_")}
  out.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  return out


def command(workdir, *extra) -> list[str]:
  return [sys.executable, "-m", "jaxunlearn.main",
          "--config", os.path.join(ROOT, "configs/digits.py"), "--workdir", str(workdir),
          *TINY, *extra]


def start(argv, devices: int, log) -> subprocess.Popen:
  """A subprocess writing to `log`.out and `log`.err (files: a pipe could fill up)."""
  with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
    p = subprocess.Popen(argv, cwd=ROOT, env=env(devices), text=True, stdout=out, stderr=err)
  p.logs = (f"{log}.out", f"{log}.err")
  return p


def start_cluster(workdir, n: int, *extra, devices: int = 2, each=None) -> list[subprocess.Popen]:
  """Processes 0..n-1 of one run on localhost, logging beside `workdir`; `each[i]`: process
  i's own extra arguments."""
  port = free_port()
  return [start(command(workdir, "--config.distributed=true",
                        f"--config.cluster.coordinator_address=127.0.0.1:{port}",
                        f"--config.cluster.num_processes={n}", f"--config.cluster.process_id={i}",
                        *extra, *(each[i] if each else ())), devices, f"{workdir}-{i}")
          for i in range(n)]


def wait(procs, timeout: float) -> list[tuple[str, str]]:
  """(stdout, stderr) of each process once all have ended; kills them all after `timeout` s."""
  deadline = time.monotonic() + timeout
  try:
    for p in procs:
      p.wait(timeout=max(deadline - time.monotonic(), 0.1))
  finally:
    stop(procs)
  return [(read(p.logs[0]), read(p.logs[1])) for p in procs]


def read(path) -> str:
  with open(path) as f:
    return f.read()


def stop(procs) -> None:
  for p in procs:
    if p.poll() is None:
      p.kill()
    p.wait()


def cluster(**values) -> ml_collections.ConfigDict:
  base = dict(coordinator_address="", num_processes=0, process_id=-1, timeout_seconds=5)
  return ml_collections.ConfigDict({**base, **values})


# ---- where the cluster comes from ----

def test_cluster_from_the_config_else_the_environment():
  environ = {"JAXUNLEARN_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAXUNLEARN_NUM_PROCESSES": "4",
             "JAXUNLEARN_PROCESS_ID": "3"}
  assert distributed.resolve(cluster(), environ) == dict(
      coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3)
  assert distributed.resolve(cluster(process_id=1), environ)["process_id"] == 1
  assert distributed.resolve(cluster(), {}) is None  # jax.distributed.initialize() detects it


@pytest.mark.parametrize("values, environ, message", [
    (dict(coordinator_address="10.0.0.1:1234"), {},
     "config.cluster.coordinator_address='10.0.0.1:1234' is set, so set "
     "config.cluster.num_processes (or JAXUNLEARN_NUM_PROCESSES) and config.cluster.process_id "
     "(or JAXUNLEARN_PROCESS_ID) too"),
    (dict(num_processes=2), {"JAXUNLEARN_PROCESS_ID": "1"},
     "set config.cluster.coordinator_address (or JAXUNLEARN_COORDINATOR_ADDRESS) too"),
    ({}, {"JAXUNLEARN_NUM_PROCESSES": "two"},
     "JAXUNLEARN_NUM_PROCESSES='two': expected an integer"),
    (dict(coordinator_address="10.0.0.1", num_processes=2, process_id=0), {},
     "expected host:port"),
    (dict(coordinator_address="h:1", num_processes=2), {"JAXUNLEARN_PROCESS_ID": "2"},
     "JAXUNLEARN_PROCESS_ID=2: expected 0..1 (config.cluster.num_processes=2)"),
])
def test_an_incomplete_or_wrong_cluster_is_one_line(values, environ, message):
  with pytest.raises(ValueError) as e:
    distributed.resolve(cluster(**values), environ)
  assert message in str(e.value) and "\n" not in str(e.value)


# ---- joining: every process or a one-line error, within the timeout ----

def rendezvous(members, timeout: float) -> dict[int, str]:
  """Runs `distributed._rendezvous` for each (process_id, num_processes) in a thread.

  Returns each process's error message, if any.
  """
  address, errors = f"127.0.0.1:{free_port()}", {}

  def one(i, n):
    try:
      distributed._rendezvous(address, n, i, timeout)
    except RuntimeError as e:
      errors[i] = str(e)
  threads = [threading.Thread(target=one, args=m) for m in members]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout + 20)
  return errors


def test_rendezvous_lets_every_process_through():
  assert rendezvous([(2, 3), (0, 3), (1, 3)], timeout=10) == {}


def test_rendezvous_names_the_missing_process_in_time():
  t0 = time.monotonic()
  errors = rendezvous([(0, 3), (2, 3)], timeout=2)
  assert time.monotonic() - t0 < 10
  expected = "multi-host: process(es) 1 of 3 did not reach process 0 at 127.0.0.1:"
  assert errors[0].startswith(expected) and errors[2] == errors[0]  # process 2 hears it from 0


def test_rendezvous_without_process_0_fails_in_time():
  t0 = time.monotonic()
  errors = rendezvous([(1, 2)], timeout=2)
  assert time.monotonic() - t0 < 10
  assert errors[1].startswith("multi-host: process 1 could not reach process 0 at 127.0.0.1:")


@pytest.mark.parametrize("members, message", [
    ([(0, 2), (1, 3)], "multi-host: process 1 has num_processes=3, process 0 has 2"),
    ([(0, 3), (1, 3), (1, 3)], "multi-host: two processes have process_id=1"),
])
def test_rendezvous_stops_every_process_of_a_mismatched_cluster(members, message):
  errors = rendezvous(members, timeout=10)
  assert set(errors) == {i for i, _ in members} and set(errors.values()) == {message}


def test_a_process_without_its_coordinator_stops_with_one_line(tmp_path):
  port = free_port()
  t0 = time.monotonic()
  out = subprocess.run(
      command(tmp_path, "--config.distributed=true",
              f"--config.cluster.coordinator_address=127.0.0.1:{port}",
              "--config.cluster.num_processes=2", "--config.cluster.process_id=1",
              "--config.cluster.timeout_seconds=2"),
      cwd=ROOT, env=env(2), capture_output=True, text=True, timeout=120)
  assert out.returncode != 0 and time.monotonic() - t0 < 60
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: multi-host: process 1 could not reach process 0 at "
                         f"127.0.0.1:{port} within 2 s"), out.stderr[-2000:]
  assert not (tmp_path / "config.json").exists()


# ---- every process runs the same config ----

def test_processes_must_agree_on_every_field_but_their_own():
  from jaxunlearn import config as config_lib
  base = config_lib.get_base_config()
  mine = base.copy_and_resolve_references()
  mine.progress, mine.compilation_cache = False, "/elsewhere"
  mine.cluster.process_id, mine.cluster.coordinator_address = 1, "10.0.0.1:1234"
  same = [distributed.shared_fields(base), distributed.shared_fields(mine)]
  assert distributed.first_difference(same) is None
  assert not any(f.startswith(("progress", "compilation_cache", "cluster.")) for f in same[0])
  mine.train.epochs, mine.forget_class = 21, "3"
  configs = [*same, distributed.shared_fields(mine)]
  # The first field in config order (forget_class comes before train), of the first process.
  assert distributed.first_difference(configs) == (
      "process 2 has forget_class='3', process 0 has '0'")


@pytest.mark.parametrize("differs, message", [
    ("--config.forget_class=3", "process 1 has forget_class='3', process 0 has '0'"),
    ("--config.train.epochs=3", "process 1 has train.epochs=3, process 0 has 2"),
])
def test_processes_with_different_configs_stop_with_one_line(tmp_path, differs, message):
  workdir = tmp_path / "w"
  procs = start_cluster(workdir, 2, "--config.cluster.timeout_seconds=60", each=[[], [differs]])
  outs = wait(procs, timeout=240)
  for p, (stdout, stderr) in zip(procs, outs):
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: multi-host: {message}; start every process with the same config "
                      "(only progress, compilation_cache and cluster.* may differ)  (--traceback "
                      "for details)"], stderr[-3000:]
    assert p.returncode == 2, stderr[-3000:]
  assert not workdir.exists()  # nothing written: the workdir is not even made


# Process 1 as `python -m jaxunlearn.main`, but slow to report its error (as a process the
# scheduler sets aside): the coordinator must not exit while it is still reporting.
SLOW_REPORTER = """
import sys, time
from jaxunlearn import exits, main
report = exits.fail
exits.fail = lambda e: (time.sleep(3), report(e))
main.run()
"""


def test_a_process_slow_to_report_still_gives_its_one_line(tmp_path):
  workdir = tmp_path / "w"
  port = free_port()
  argv = [command(workdir, "--config.distributed=true", "--config.cluster.timeout_seconds=60",
                  f"--config.cluster.coordinator_address=127.0.0.1:{port}",
                  "--config.cluster.num_processes=2", f"--config.cluster.process_id={i}",
                  *(["--config.forget_class=3"] if i else [])) for i in range(2)]
  argv[1][1:3] = ["-c", SLOW_REPORTER]  # in place of "-m jaxunlearn.main"
  procs = [start(a, 2, f"{workdir}-{i}") for i, a in enumerate(argv)]
  outs = wait(procs, timeout=240)
  for p, (stdout, stderr) in zip(procs, outs):
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "process 1 has forget_class='3'" in errors[0], stderr[-3000:]
    assert p.returncode == 2, stderr[-3000:]


# ---- a run on two processes ----

@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  single, multi = tmp_path / "single", tmp_path / "multi"
  # The reference run beside the cluster: neither keeps both cores busy.
  procs = [start(command(single), 4, single), *start_cluster(multi, 2)]
  outs = wait(procs, timeout=300)
  for p, (stdout, stderr) in zip(procs, outs):
    assert p.returncode == 0, stderr[-3000:]
  outs = outs[1:]
  # Process 0 reports; process 1 writes no report of its own.
  assert "| Gradient Ascent |" in outs[0][0] and "| Model |" not in outs[1][0]
  with open(multi / "results.json") as f:
    assert list(json.load(f)["models"]) == list(MODELS)
  assert sorted(p.name for p in multi.iterdir() if not p.name.startswith(".")) == sorted(
      p.name for p in single.iterdir() if not p.name.startswith("."))
  # 2 processes x 2 devices take the same steps as 1 x 4: the same losses up to the
  # order of the gradient all-reduce (float32).
  for m in MODELS:
    a = checkpoints.read_record(str(single / "checkpoints" / m))["loss"]
    b = checkpoints.read_record(str(multi / "checkpoints" / m))["loss"]
    assert len(a) == len(b) > 0, m
    np.testing.assert_allclose(b, a, rtol=1e-5, err_msg=m)


# ---- a lost process ----

@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0])
def test_a_lost_process_stops_the_other(tmp_path, victim):
  """Killed mid-run, a process leaves the other blocked in a collective: it must stop.

  A lost worker: the survivor's watchdog notices within timeout_seconds (one line).
  A lost coordinator (process 0): JAX itself aborts the survivor at once.
  """
  workdir = tmp_path / "w"
  procs = start_cluster(workdir, 2, "--config.train.epochs=500",
                        "--config.cluster.timeout_seconds=10")
  try:
    deadline = time.monotonic() + 180
    while not (workdir / "config.json").exists():  # written once both have joined
      assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
          read(procs[0].logs[1])[-3000:]
      time.sleep(0.2)
    time.sleep(2)
    procs[victim].send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    survivor = procs[1 - victim]
    try:
      survivor.wait(timeout=90)
    except subprocess.TimeoutExpired:
      pytest.fail(f"process {1 - victim} still running 90 s after process {victim} died")
    elapsed = time.monotonic() - t0
  finally:
    stop(procs)
  stderr = read(survivor.logs[1])
  assert survivor.returncode != 0
  assert elapsed < 60, elapsed
  if victim == 1:
    assert stderr.strip().splitlines()[-1] == (
        "error: multi-host: process 1 stopped responding (no sign of life for 10 s, "
        "config.cluster.timeout_seconds); stopping this process too"), stderr[-3000:]
  else:
    assert ("JAX distributed service detected fatal errors" in stderr
            or "error: multi-host: lost the coordinator" in stderr), stderr[-3000:]
