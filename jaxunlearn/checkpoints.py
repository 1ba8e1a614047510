"""Orbax checkpoints of every stage: one CheckpointManager per stage folder.

A trained model's folder (`checkpoints/<model>`) holds its parameters
(StandardSave) and a JSON record of how it was made (wall time, loss curve); an
evaluation's folder (`eval/<model>`) holds its metrics (JSON) and arrays (test
probabilities, t-SNE features). A stage whose checkpoint exists is restored
instead of recomputed, so rerunning a command on the same workdir resumes.

Pipeline tasks run in threads, and orbax's save machinery is not safe to enter
from several threads at once, so saves and restores take turns (they are short
next to the work they record).
"""
from __future__ import annotations

import os
import threading

import orbax.checkpoint as ocp

from jaxunlearn import workdir

_LOCK = threading.Lock()


def _manager(path: str, item_names) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(os.path.abspath(path), item_names=tuple(item_names),
                               options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))


def save(path: str, step: int, *, arrays, record: dict, arrays_name: str = "params") -> None:
  """Saves a pytree of arrays and a JSON-able record as one checkpoint step."""
  with _LOCK, _manager(path, (arrays_name, "record")) as mngr:
    mngr.save(step, args=ocp.args.Composite(**{arrays_name: ocp.args.StandardSave(arrays),
                                               "record": ocp.args.JsonSave(record)}))
    mngr.wait_until_finished()


def read_record(path: str, arrays_name: str = "params") -> dict | None:
  """The JSON record of a finished stage alone (its arrays stay on disk), or None."""
  if not os.path.isdir(path):
    return None
  with _LOCK, _manager(path, (arrays_name, "record")) as mngr:
    step = mngr.latest_step()
    if step is None:
      return None
    return mngr.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))["record"]


def restore(path: str, abstract_arrays=None, arrays_name: str = "params", inputs: dict | None = None):
  """(arrays, record) of a finished stage, or None when there is no checkpoint.

  `abstract_arrays` (e.g. from jax.eval_shape, with shardings) fixes structure,
  dtypes and placement; None restores as saved. With `inputs`, the record's
  inputs must equal them (`workdir.check_inputs`), else a one-line ValueError.
  """
  if inputs is not None:
    record = read_record(path, arrays_name)
    if record is None:
      return None
    workdir.check_inputs(path, record.get("inputs"), inputs)
  if not os.path.isdir(path):
    return None
  with _LOCK, _manager(path, (arrays_name, "record")) as mngr:
    step = mngr.latest_step()
    if step is None:
      return None
    out = mngr.restore(step, args=ocp.args.Composite(**{
        arrays_name: ocp.args.StandardRestore(abstract_arrays),
        "record": ocp.args.JsonRestore()}))
  return out[arrays_name], out["record"]
