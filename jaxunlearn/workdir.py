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
import json
import os
import tempfile

import jax

from jaxunlearn import lock
from jaxunlearn.lock import FIXES, LOCK_FILE, WorkdirError  # noqa: F401  (re-exported)

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
  except BaseException as e:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    if isinstance(e, OSError) and e.errno in FIXES:
      raise WorkdirError(f"cannot write {path} ({e.strerror}); {FIXES[e.errno]}") from None
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
  if k.rsplit(".", 1)[-1] == "stage" and k not in old:
    raise ValueError(f"{path} records no stage name (written by an older jaxunlearn); "
                     f"delete it to recompute it, or use a new --workdir")
  raise ValueError(f"{path} was computed with {k}={old.get(k)!r}, this run has {new.get(k)!r} "
                   f"({len(diff)} field(s) differ); use a new --workdir to keep both, or delete "
                   f"{path} to recompute it")


@contextlib.contextmanager
def claim(config, workdir: str):
  """Makes the workdir this run's alone (an OS lock); yields the config as a dict.

  `record_config` writes it to config.json once the run's checkpoints are known to
  fit it.

  A second run on a workdir in use stops at once with one line naming the other
  process (`lock.acquire`). In multi-host runs process 0 holds it. A run whose lock
  file disappears stops at its next stage (`check_lock`; the command line checks
  every second).
  """
  config_dict = json.loads(config.to_json())
  _check_writable(workdir)
  if jax.process_index() != 0:
    yield config_dict
    return
  lock.acquire(workdir)
  try:
    _check_config_json(os.path.join(workdir, "config.json"))
    yield config_dict
  finally:
    lock.release(workdir)


def check_lock() -> None:
  """Stops (WorkdirError) when this process's workdir lock was deleted or replaced."""
  lock.check()


def _check_writable(workdir: str) -> None:
  """Creates the workdir and writes a probe file there, named for this process alone."""
  try:
    os.makedirs(workdir, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=workdir, prefix=".write_test-")
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    if e.errno in FIXES:
      raise WorkdirError(f"cannot write to {workdir!r} ({e.strerror}); {FIXES[e.errno]}") from None
    raise ValueError(f"--workdir: cannot write to {workdir!r} ({e.strerror}); "
                     "choose a writable folder") from None


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
