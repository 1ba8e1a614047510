"""Orbax checkpoints of every stage: one CheckpointManager per stage folder.

A trained model's folder (`checkpoints/<model>`) holds its parameters and a JSON
record of how it was made (its inputs, run and compile time, loss curve); an
evaluation's folder (`eval/<model>`) holds its metrics and arrays (test
probabilities, t-SNE features); a running stage keeps its latest full training
state in `checkpoints/<model>.partial`. A stage whose checkpoint exists is
restored instead of recomputed, so rerunning a command on the same workdir resumes.

Every save records a SHA-256 digest of its arrays and of its record; a restore
recomputes both, so a flipped byte, a truncated or deleted file or an edited
record stops the run with one line naming the folder, never a wrong table.

Pipeline tasks run in threads, and orbax's save machinery is not safe to enter
from several threads at once, so saves and restores take turns (they are short
next to the work they record).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxunlearn import workdir

_LOCK = threading.Lock()


class CheckpointError(workdir.WorkdirError):
  """A checkpoint that cannot be read or written: one line naming its folder and the fix
  (a ValueError; the command line exits with EXIT_ENVIRONMENT)."""


def _manager(path: str) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.abspath(path),
      options=ocp.CheckpointManagerOptions(
          create=True, cleanup_tmp_directories=True,
          preservation_policy=ocp.checkpoint_managers.LatestN(1)))


def digest(tree) -> str:
  """SHA-256 over a pytree's structure, dtypes, shapes and bytes."""
  h = hashlib.sha256()
  leaves, treedef = jax.tree.flatten(tree)
  h.update(str(treedef).encode())
  for x in leaves:
    a = np.ascontiguousarray(np.asarray(jax.device_get(x)))
    h.update(f"{a.dtype}{a.shape}".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def _record_digest(record: dict) -> str:
  return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _damaged(path: str, what: str) -> CheckpointError:
  return CheckpointError(f"{path} is damaged ({what}); delete that folder to recompute it, "
                         "or use a new --workdir")


# The arrays' layout: 2 since models carry state (a stage's arrays are its variables
# {"params", ...model state}; a snapshot's {"params", "model_state", "opt"}).
LAYOUT = 2


def _check_record(path: str, record) -> None:
  """The record is intact (its digest) and of this version's layout."""
  record = dict(record)
  if record.pop("record_digest", None) != _record_digest(record):
    raise _damaged(path, "its record does not match its digest")
  got = record.get("layout", 1)
  if got != LAYOUT:
    raise CheckpointError(f"{path} was written by another jaxunlearn version (checkpoint layout "
                          f"{got}, this one reads {LAYOUT}); use a new --workdir, or delete "
                          "that folder to recompute it")


def save(path: str, step: int, *, arrays, record: dict, arrays_name: str = "params") -> None:
  """Saves a pytree of arrays and a JSON-able record as one checkpoint step (atomically)."""
  record = dict(record, layout=LAYOUT, arrays_digest=digest(arrays))
  record["record_digest"] = _record_digest(record)
  try:
    with _LOCK, _manager(path) as mngr:
      mngr.save(step, args=ocp.args.Composite(**{arrays_name: ocp.args.StandardSave(arrays),
                                                 "record": ocp.args.JsonSave(record)}), force=True)
      mngr.wait_until_finished()
  except Exception as e:  # disk full, workdir gone, permissions: one line, nothing half-written
    raise CheckpointError(f"cannot write {path} ({type(e).__name__}: "
                          f"{(str(e).strip().splitlines() or [''])[0][:200]}); free space or "
                          "check the workdir, then rerun the command to resume") from e


def _read(path: str, arrays_name: str, abstract_arrays, with_arrays: bool):
  if not os.path.isdir(path):
    return None
  try:
    with _LOCK, _manager(path) as mngr:
      step = mngr.latest_step()
      if step is None:
        return None
      out = dict(mngr.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore())))
      _check_record(path, out["record"])  # before the arrays: an old layout would not restore
      if with_arrays:
        out.update(mngr.restore(step, args=ocp.args.Composite(
            **{arrays_name: ocp.args.StandardRestore(abstract_arrays)})))
  except CheckpointError:
    raise
  except Exception as e:
    raise _damaged(path, f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}") from e
  record = dict(out["record"])
  record.pop("record_digest", None)
  if with_arrays and record.get("arrays_digest") != digest(out[arrays_name]):
    raise _damaged(path, "its arrays do not match their digest")
  return (out[arrays_name] if with_arrays else None), record


def read_record(path: str, arrays_name: str = "params") -> dict | None:
  """The JSON record of a finished stage alone (its arrays stay on disk), or None."""
  out = _read(path, arrays_name, None, with_arrays=False)
  return None if out is None else out[1]


def restore(path: str, abstract_arrays=None, arrays_name: str = "params", inputs: dict | None = None):
  """(arrays, record) of a finished stage, or None when there is no checkpoint.

  `abstract_arrays` (e.g. from jax.eval_shape, with shardings) fixes structure,
  dtypes and placement; None restores as saved. With `inputs`, the record's
  inputs must equal them (`workdir.check_inputs`), else a one-line ValueError.
  Damage (unreadable files, digests that do not match) raises `CheckpointError`.
  """
  out = _read(path, arrays_name, abstract_arrays, with_arrays=True)
  if out is not None and inputs is not None:
    workdir.check_inputs(path, out[1].get("inputs"), inputs)
  return out


def remove(path: str) -> None:
  shutil.rmtree(path, ignore_errors=True)


class Snapshots:
  """Periodic saves of a running stage's full training state (`<stage>.partial`).

  `Trainer.run` asks `due()` at every chunk boundary; a snapshot is due every
  `every_chunks` chunks or `every_seconds` seconds (0 turns either off). Only the
  latest is kept; the stage deletes the folder once its final checkpoint exists.
  Its position is a step (phase, steps done in it), never a chunk index, so a run
  with another `steps_per_chunk` resumes it exactly.
  """

  def __init__(self, path: str, inputs: dict, *, every_chunks: int, every_seconds: float,
               seconds_before: float = 0.0):
    import time
    self.path, self.inputs = path, inputs
    self.every_chunks, self.every_seconds = every_chunks, every_seconds
    self._clock = time.perf_counter
    self._start = self._last = self._clock()
    self._chunks = 0
    self.seconds_before = seconds_before

  def due(self) -> bool:
    self._chunks += 1
    return bool((self.every_chunks and self._chunks % self.every_chunks == 0) or
                (self.every_seconds and self._clock() - self._last >= self.every_seconds))

  def save(self, position: dict, arrays: dict, log: dict) -> None:
    save(self.path, len(log["loss"]), arrays=arrays, record=dict(
        position, inputs=self.inputs, optimizers=sorted(arrays["opt"]), loss=log["loss"],
        seconds=self.seconds_before + self._clock() - self._start))
    self._last = self._clock()

  def latest(self, template_fn) -> dict | None:
    """The latest snapshot as `Trainer.run`'s `resume`, or None.

    `template_fn(optimizer_names)` gives the abstract arrays to restore into.
    A snapshot of other inputs than this run's is an error, as for a finished stage.
    """
    record = read_record(self.path)
    if record is None:
      return None
    workdir.check_inputs(self.path, record.get("inputs"), self.inputs)
    arrays, record = _read(self.path, "params", template_fn(record["optimizers"]), with_arrays=True)
    self.seconds_before = record["seconds"]
    return {"phase": record["phase"], "step": record["step"], "arrays": arrays,
            "loss": record["loss"]}
