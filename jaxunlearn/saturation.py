"""A saturated model: one that stopped being trained, though nothing became non-finite.

Gradient ascent at a large learning rate reaches, within a step or two, a model that
puts probability 1 on one class for every input: from then on its gradient
underflows to 0, its loss is exactly the same at every step, its parameters are
finite, and its row (forget 100 or 0, retain ~10, entropy 0) reads like a result.
Such a model is marked beside its metrics, as a diverged one is (`train.Diverged`),
in `results.json` and in every table (`report.py`):

  saturated_class  every test prediction is this one class;
  saturated_step   the stage's loss stayed exactly the same from this step to its
                   end, over FLAT_STEPS steps or more.

A model can have either mark or both; its metrics are still reported.
"""
from __future__ import annotations

import numpy as np

# Steps of an exactly constant loss that mark a stage: each step draws another batch,
# so even a few equal losses in a row mean the model no longer responds to its data.
FLAT_STEPS = 10


def check(test_probs_NxC, loss) -> dict[str, int]:
  """The marks of one model (none: {}) from its test probabilities and its stage's loss curve."""
  out = {}
  predicted = np.unique(np.argmax(np.asarray(test_probs_NxC), axis=-1))
  if len(test_probs_NxC) > 1 and len(predicted) == 1:
    out["saturated_class"] = int(predicted[0])
  loss_T = np.asarray(loss, np.float64)
  if len(loss_T) >= FLAT_STEPS:
    changed = np.flatnonzero(loss_T != loss_T[-1])  # -0.0 == 0.0: no change
    first = int(changed[-1]) + 1 if len(changed) else 0
    if len(loss_T) - first >= FLAT_STEPS:
      out["saturated_step"] = first
  return out
