"""Evaluation: one pass of a model over each split, then the study's metrics.

Per-example metrics are the vmapped functions of `metrics.py`; the summary is one
jitted reduction. Accuracies are percentages.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxunlearn import metrics


@jax.jit
def summarize(train_probs_NxC, train_labels_N, test_probs_MxC, test_labels_M,
              gold_test_probs_MxC, forget_train_N, forget_test_M):
  """The study's metrics; `forget_*` are the scenario's boolean forget masks."""
  def mean(values, where):
    return jnp.sum(values * where) / jnp.maximum(jnp.sum(where), 1)

  f_tr = forget_train_N.astype(jnp.float32)
  f_te = forget_test_M.astype(jnp.float32)
  ok_tr = metrics.batch_correct(train_probs_NxC, train_labels_N)
  ok_te = metrics.batch_correct(test_probs_MxC, test_labels_M)
  return dict(
      forget_train_acc=100 * mean(ok_tr, f_tr),
      retain_train_acc=100 * mean(ok_tr, 1 - f_tr),
      forget_test_acc=100 * mean(ok_te, f_te),
      retain_test_acc=100 * mean(ok_te, 1 - f_te),
      test_acc=100 * jnp.mean(ok_te),
      entropy_forget_test=mean(metrics.batch_entropy(test_probs_MxC), f_te),
      jsd_gold_forget_test=mean(metrics.batch_jsd(test_probs_MxC, gold_test_probs_MxC), f_te),
  )


def tsne_indices(forget_N: np.ndarray, *, batch_size: int, num_retain: int, num_forget: int,
                 seed: int) -> np.ndarray:
  """Training indices for t-SNE: whole shuffled batches until both counts are reached.

  `forget_N` is the scenario's forget mask over the training set. Stops early
  (with what it has) when the data set runs out.
  """
  if num_retain == 0 and num_forget == 0:
    return np.zeros((0,), np.int64)
  order = np.random.default_rng(seed).permutation(len(forget_N))
  is_forget = forget_N[order]
  for end in range(batch_size, len(order) + batch_size, batch_size):
    f = int(is_forget[:end].sum())
    if f >= num_forget and min(end, len(order)) - f >= num_retain:
      break
  return order[:end]
