"""The workdir: where a run's checkpoints and results live, and what each was computed from.

Every stage's checkpoint records its inputs: what makes it that stage (its name and
the pools it trains on), the config fields that determine it (`stage_inputs`) and
the inputs of the stage it started from. A restore compares
them with the current run's and stops with one line on any difference, so a
workdir never serves results computed from something else. Different method lists
share a workdir: a new method reuses the Original and Gold already trained there.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import tempfile

import jax

LOCK_FILE = ".lock"

# Fields that decide every stage's result (besides the stage's own section).
COMMON_FIELDS = ("seed", "scenario", "forget_class", "forget_fraction", "forget_subclass",
                 "batch_size", "data", "model")


def atomic_write(path: str, data: bytes | str) -> None:
  """Writes to a temporary name and renames it into place: never a half-written file."""
  mode = "wb" if isinstance(data, bytes) else "w"
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-")
  try:
    with os.fdopen(fd, mode) as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def _plain(value):
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  return json.loads(json.dumps(value))  # tuples -> lists, as JSON gives them back


def stage_inputs(config, section: str | None, parent: dict | None = None, *, stage: str,
                 pools, **extra) -> dict:
  """What a stage's result depends on: the common fields, its section, its parent's inputs.

  `stage` (its name) and `pools` (the training pools its streams draw from) make the
  record the stage's own: Original and Gold share their section and parent, so
  without them a copy of checkpoints/original would pass for checkpoints/retrain.
  """
  out = {"stage": stage, "pool": sorted(pools)}
  out.update({f: _plain(config[f]) for f in COMMON_FIELDS})
  if section is not None:
    out[section] = _plain(config[section])
  if parent is not None:
    out["from"] = parent
  out.update({k: _plain(v) for k, v in extra.items()})
  return out


def _flat(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def check_inputs(path: str, recorded: dict | None, expected: dict) -> None:
  """Stops with one line when a checkpoint was computed from other inputs than this run's."""
  if recorded == expected:
    return
  if recorded is None:
    raise ValueError(f"{path} records no inputs (written by an older jaxunlearn); "
                     f"delete it to recompute it, or use a new --workdir")
  old, new = _flat(recorded), _flat(expected)
  # A stage's name first: a folder holding another stage says so, not a field it implies.
  diff = sorted((k for k in old.keys() | new.keys() if old.get(k) != new.get(k)),
                key=lambda k: (k.rsplit(".", 1)[-1] != "stage", k))
  k = diff[0]
  raise ValueError(f"{path} was computed with {k}={old.get(k)!r}, this run has {new.get(k)!r} "
                   f"({len(diff)} field(s) differ); use a new --workdir to keep both, or delete "
                   f"{path} to recompute it")


@contextlib.contextmanager
def claim(config, workdir: str):
  """Makes the workdir this run's alone (an OS lock); yields the config as a dict.

  `record_config` writes it to config.json once the run's checkpoints are known to
  fit it.

  A second run on a workdir in use stops at once with one line naming the other
  process. The lock is `fcntl.flock` on `<workdir>/.lock`: the OS releases it when
  its process ends, however it ends, so a killed run never blocks the next one.
  In multi-host runs process 0 holds it.
  """
  config_dict = json.loads(config.to_json())
  try:
    os.makedirs(workdir, exist_ok=True)
    atomic_write(os.path.join(workdir, ".write_test"), "")
    os.remove(os.path.join(workdir, ".write_test"))
  except OSError as e:
    raise ValueError(f"--workdir: cannot write to {workdir!r} ({e.strerror}); "
                     "choose a writable folder") from None
  if jax.process_index() != 0:
    yield config_dict
    return
  fd = os.open(os.path.join(workdir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
      raise ValueError(f"--workdir {workdir!r} is in use by {holder}; wait for it to finish, "
                       "or use another --workdir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}".encode(), 0)
    _check_config_json(os.path.join(workdir, "config.json"))
    yield config_dict
  finally:
    os.close(fd)  # releases the lock


def record_config(workdir: str, config_dict: dict) -> None:
  if jax.process_index() == 0:
    atomic_write(os.path.join(workdir, "config.json"), json.dumps(config_dict, indent=2))


def _check_config_json(path: str) -> None:
  """A damaged config.json means the workdir was tampered with: say so rather than overwrite it."""
  if not os.path.exists(path):
    return
  try:
    with open(path) as f:
      json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{path} is damaged ({type(e).__name__}); delete it (every checkpoint records "
                     "its own inputs) and rerun") from None
