"""Orbax checkpoints of trained models: one CheckpointManager per model.

A model's folder holds its parameters (StandardSave) and a JSON record of how it
was made (wall time, loss curve). A stage whose checkpoint exists is restored
instead of retrained, so rerunning a command on the same workdir resumes.
"""
from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


def _manager(workdir: str, name: str) -> ocp.CheckpointManager:
  path = os.path.abspath(os.path.join(workdir, "checkpoints", name))
  return ocp.CheckpointManager(path, item_names=("params", "record"),
                               options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))


def save(workdir: str, name: str, step: int, params, record: dict) -> None:
  with _manager(workdir, name) as mngr:
    mngr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                            record=ocp.args.JsonSave(record)))
    mngr.wait_until_finished()


def restore(workdir: str, name: str, abstract_params):
  """(params, record) of a finished stage, or None when there is no checkpoint.

  `abstract_params` (e.g. from jax.eval_shape) fixes structure, dtypes and shardings.
  """
  if not os.path.isdir(os.path.join(workdir, "checkpoints", name)):
    return None
  with _manager(workdir, name) as mngr:
    step = mngr.latest_step()
    if step is None:
      return None
    out = mngr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params), record=ocp.args.JsonRestore()))
  return out.params, out.record
