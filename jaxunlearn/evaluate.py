"""Evaluation: one eval-mode pass of a model over each split (`predict`), then the study's metrics.

Per-example metrics are the vmapped functions of `metrics.py`; the summary is one
jitted reduction. Accuracies are percentages.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxunlearn import metrics, privacy


def _predict(env, variables, data, *, width: int, num_batches: int, with_loss: bool = False):
  images_N, labels_N = data
  n = labels_N.shape[0]
  idx = jnp.minimum(jnp.arange(num_batches * width), n - 1)
  idx = jax.lax.with_sharding_constraint(idx.reshape(num_batches, -1), env.data.table_sharded)

  def one(idx_B):
    x = env.data.preprocess(env.data.pixels(images_N[idx_B]))
    logits, features, _ = env.model.apply(variables, x, train=False)
    # From the logits: a loss read off float32 probabilities stops at -log(smallest p).
    loss_B = optax.softmax_cross_entropy_with_integer_labels(logits, labels_N[idx_B])
    return jax.nn.softmax(logits, axis=-1), features, loss_B

  probs, feats, loss = jax.lax.map(one, idx)
  out = probs.reshape(-1, probs.shape[-1])[:n], feats.reshape(-1, feats.shape[-1])[:n]
  return (*out, loss.reshape(-1)[:n]) if with_loss else out


predict = jax.jit(_predict, static_argnums=0,
                  static_argnames=("width", "num_batches", "with_loss"))
predict.__doc__ = """predict(env, variables, (images, labels), width=, num_batches=, with_loss=False)
-> (probs_NxC, features_NxD[, loss_N]).

Every example of a split through the model in eval mode (BatchNorm on its running
statistics), `num_batches` batches of `width` rows (the last one repeats the last
example; the extra rows are cut off). `env` is the run's `steps.Env`. `loss_N`: each
example's cross-entropy computed from its logits (log-softmax), as deepunlearn's
`evaluation/losses.py` (`CrossEntropyLoss(reduction="none")`)."""


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


# Metrics that need a forget set inside the test set: omitted in random-subset forgetting.
# Raised when a metric's definition changes, so stored evaluations are recomputed rather
# than reused (2: loss-MIA from logits, no longer from clipped probabilities).
METRICS_VERSION = 2

FORGET_TEST_METRICS = ("forget_test_acc", "entropy_forget_test", "jsd_gold_forget_test")


def privacy_metrics(forget_train_N, forget_test_M, train_probs_NxC, train_labels_N,
                    test_probs_MxC, test_labels_M, train_feats_NxD, test_feats_MxD,
                    *, train_loss_N, test_loss_M, seed: int,
                    class_wise: bool | None = None) -> dict[str, float]:
  """MIA-efficacy, loss-MIA (+ indiscernibility) and linear-probe forget accuracy of one model.

  Non-members are test examples. MIA-efficacy (Unlearn-Sparse): members = the first
  len(non-members) retain-train examples, non-members = the test set without the
  forgotten classes, targets = the forget set. Loss-MIA (deepunlearn): the per-example
  cross-entropy from the logits (`train_loss_N`, `test_loss_M`: `predict(...,
  with_loss=True)`) of the forget set against the test examples of its classes
  (class-wise) or the whole test set (random subset), so Gold scores ~50%. Probe: fit on the frozen features of every
  training example (class-wise; scored on the forgotten classes' test examples) or of
  the retain set (random subset; scored on the forget set).

  `class_wise`: the scenario's kind picks the definitions ("class" and "subclass": True,
  "random": False). A class-wise scenario whose forgotten classes have no test examples
  leaves out the metrics scored on them (loss-MIA, the probe), as it leaves out those too
  few to score, rather than switching to the random-subset ones. None: class-wise when
  any test example is forgotten (which that case mistakes for random forgetting).
  """
  if class_wise is None:
    class_wise = bool(np.any(forget_test_M))
  train_conf = privacy.true_label_confidence(train_probs_NxC, train_labels_N)
  test_conf = privacy.true_label_confidence(test_probs_MxC, test_labels_M)
  nonmember = test_conf[~forget_test_M]
  member = train_conf[~forget_train_N][:len(nonmember)]
  out = {"mia_efficacy": privacy.mia_efficacy(member, nonmember, train_conf[forget_train_N])}
  losses_N, losses_M = np.asarray(train_loss_N), np.asarray(test_loss_M)
  mia = privacy.loss_mia(losses_N[forget_train_N],
                         losses_M[forget_test_M] if class_wise else losses_M, seed=seed)
  if mia is not None:  # too few examples: omitted, not faked
    out["loss_mia"], out["indiscernibility"] = mia
  if class_wise:
    if np.any(forget_test_M):  # nothing to score it on otherwise: omitted, not faked
      out["probe_forget_acc"] = privacy.linear_probe_accuracy(
          train_feats_NxD, train_labels_N, test_feats_MxD[forget_test_M],
          test_labels_M[forget_test_M])
  else:
    out["probe_forget_acc"] = privacy.linear_probe_accuracy(
        train_feats_NxD[~forget_train_N], train_labels_N[~forget_train_N],
        train_feats_NxD[forget_train_N], train_labels_N[forget_train_N])
  return out


# Gaps to Gold: |method - Gold| of these (UA = 100 - forget accuracy, so its gap is
# the forget accuracy's); avg gap is their mean (SalUn's "Avg. Gap").
GAP_METRICS = ("forget_train_acc", "retain_train_acc", "retain_test_acc", "mia_efficacy")


def gaps_to_gold(model: dict, gold: dict) -> dict[str, float]:
  """Per-metric gaps, avg gap, ToW and run-time efficiency of one model against Gold.

  ToW (RUM): (1 - |dFA|/100)(1 - |dRA|/100)(1 - |dTA|/100) with FA the forget-train,
  RA the retain-train and TA the test accuracy without the forgotten classes
  (retain_test_acc); 1 is Gold. RTE (deepunlearn): Gold's run time / the model's.
  """
  gaps = {f"gap_{k}": abs(model[k] - gold[k]) for k in GAP_METRICS}
  tow = 1.0
  for k in ("forget_train_acc", "retain_train_acc", "retain_test_acc"):
    tow *= 1 - abs(model[k] - gold[k]) / 100
  return dict(gaps, avg_gap=float(np.mean(list(gaps.values()))), tow=tow,
              rte=gold["seconds"] / max(model["seconds"], 1e-9))
