"""What an attacker or a probe can still read from a model: the field's privacy metrics.

Each takes host arrays of one model's outputs (class probabilities, features) and
fits a small scikit-learn model, as the reference code does. Percentages, except
indiscernibility (in [0, 1]).
"""
from __future__ import annotations

import numpy as np


def true_label_confidence(probs_NxC: np.ndarray, labels_N: np.ndarray) -> np.ndarray:
  return np.asarray(probs_NxC)[np.arange(len(labels_N)), np.asarray(labels_N)]


def mia_efficacy(member_conf: np.ndarray, nonmember_conf: np.ndarray,
                 target_conf: np.ndarray) -> float:
  """Unlearn-Sparse's MIA-efficacy (`evaluation/SVC_MIA.py`, the "confidence" attack).

  An RBF SVC (C=3, gamma='auto') learns member (1) vs non-member (0) from the
  true-label confidence; the result is the percentage of target (forget) examples
  it calls non-members. The caller picks the sets as `main_forget.py` does:
  members = the first len(non-members) retain-train examples, non-members = the
  test set (without the forgotten classes in class-wise forgetting).
  """
  from sklearn.svm import SVC
  x = np.r_[member_conf, nonmember_conf].astype(np.float64)[:, None]
  y = np.r_[np.ones(len(member_conf)), np.zeros(len(nonmember_conf))]
  clf = SVC(C=3, gamma="auto", kernel="rbf").fit(x, y)
  return float(100 * np.mean(clf.predict(np.asarray(target_conf, np.float64)[:, None]) == 0))


MIN_LOSS_MIA = 4  # examples per side


def loss_mia(forget_losses: np.ndarray, nonmember_losses: np.ndarray, seed: int,
             splits: int = 10) -> tuple[float, float] | None:
  """Loss-based membership inference (deepunlearn `evaluation/membership_inference_attack.py`).

  Both sets shuffled (seeded) and cut to the smaller size; logistic regression on
  the per-example loss, forget (1) vs non-member (0); mean accuracy over a
  stratified shuffle split (10 splits, 10% held out). Returns (accuracy in
  percent, indiscernibility = 1 - |acc - 0.5| / 0.5): 50% and 1 are ideal; None
  when either set has fewer than `MIN_LOSS_MIA` examples (no meaningful split).
  With fewer than 10 pairs the held-out share grows so each split tests one pair.
  """
  from sklearn.linear_model import LogisticRegression
  from sklearn.model_selection import StratifiedShuffleSplit, cross_val_score
  r = np.random.default_rng(seed)
  f, n = r.permutation(np.asarray(forget_losses)), r.permutation(np.asarray(nonmember_losses))
  m = min(len(f), len(n))
  if m < MIN_LOSS_MIA:
    return None
  x = np.r_[f[:m], n[:m]].astype(np.float64)[:, None]
  y = np.r_[np.ones(m), np.zeros(m)]
  cv = StratifiedShuffleSplit(n_splits=splits, test_size=max(0.1, 1 / m), random_state=seed)
  acc = float(np.mean(cross_val_score(LogisticRegression(), x, y, cv=cv, scoring="accuracy")))
  return 100 * acc, 1 - abs(acc - 0.5) / 0.5


def linear_probe_accuracy(fit_features: np.ndarray, fit_labels: np.ndarray,
                          eval_features: np.ndarray, eval_labels: np.ndarray) -> float:
  """Accuracy (percent) on the eval set of a logistic probe fit on frozen features.

  Standardised features, multinomial logistic regression (lbfgs). When only the
  head forgot, such a probe still finds the forgotten class in the features
  ("An illusion of unlearning?", arXiv 2604.08271).
  """
  from sklearn.linear_model import LogisticRegression
  from sklearn.pipeline import make_pipeline
  from sklearn.preprocessing import StandardScaler
  probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
  probe.fit(np.asarray(fit_features, np.float64), np.asarray(fit_labels))
  return float(100 * probe.score(np.asarray(eval_features, np.float64), np.asarray(eval_labels)))
