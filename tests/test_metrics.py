"""Metrics against scipy / numpy."""
import numpy as np
from scipy.spatial.distance import jensenshannon

from jaxunlearn import evaluate, metrics

rng = np.random.default_rng(1)


def _probs(n, c=10, zeros=True):
  p = rng.dirichlet(np.full(c, 0.3), size=n)
  if zeros:  # exact zeros exercise the 0 log 0 = 0 convention
    p[::3, 0] = 0
    p /= p.sum(-1, keepdims=True)
  return p.astype(np.float32)


def test_jsd_matches_scipy():
  p, q = _probs(50), _probs(50)
  want = np.array([jensenshannon(a.astype(np.float64), b.astype(np.float64)) for a, b in zip(p, q)])
  np.testing.assert_allclose(metrics.batch_jsd(p, q), want, atol=2e-6)


def test_jsd_extremes():
  p = _probs(5)
  np.testing.assert_allclose(metrics.batch_jsd(p, p), 0, atol=1e-6)
  a, b = np.eye(3, dtype=np.float32)[:1], np.eye(3, dtype=np.float32)[1:2]
  np.testing.assert_allclose(metrics.batch_jsd(a, b), np.sqrt(np.log(2)), rtol=1e-6)


def test_entropy_matches_numpy():
  p = _probs(20)
  want = -np.sum(p.astype(np.float64) * np.log(p.astype(np.float64) + 1e-9), -1)
  np.testing.assert_allclose(metrics.batch_entropy(p), want, rtol=1e-5, atol=1e-6)


def test_summarize_matches_numpy():
  ntr, nte, fc = 40, 30, 2
  ytr, yte = rng.integers(0, 4, ntr), rng.integers(0, 4, nte)
  ptr, pte, gold = _probs(ntr, 4), _probs(nte, 4), _probs(nte, 4)
  got = evaluate.summarize(ptr, ytr, pte, yte, gold, ytr == fc, yte == fc)
  ok_tr, ok_te = ptr.argmax(-1) == ytr, pte.argmax(-1) == yte
  f_tr, f_te = ytr == fc, yte == fc
  np.testing.assert_allclose(got["forget_train_acc"], 100 * ok_tr[f_tr].mean(), rtol=1e-6)
  np.testing.assert_allclose(got["retain_train_acc"], 100 * ok_tr[~f_tr].mean(), rtol=1e-6)
  np.testing.assert_allclose(got["forget_test_acc"], 100 * ok_te[f_te].mean(), rtol=1e-6)
  np.testing.assert_allclose(got["retain_test_acc"], 100 * ok_te[~f_te].mean(), rtol=1e-6)
  ent = -np.sum(pte * np.log(pte + 1e-9), -1)
  np.testing.assert_allclose(got["entropy_forget_test"], ent[f_te].mean(), rtol=1e-5)
  jsd = [jensenshannon(a, b) for a, b in zip(pte[f_te].astype(np.float64), gold[f_te].astype(np.float64))]
  np.testing.assert_allclose(got["jsd_gold_forget_test"], np.mean(jsd), rtol=1e-5)


def test_tsne_indices_takes_whole_batches_until_both_counts():
  labels = np.r_[np.zeros(30), np.ones(170)].astype(int)
  idx = evaluate.tsne_indices(labels == 0, batch_size=16, num_retain=50, num_forget=10, seed=0)
  assert len(idx) % 16 == 0 and len(set(idx)) == len(idx)
  f = (labels[idx] == 0).sum()
  assert f >= 10 and len(idx) - f >= 50
  assert (labels[idx[:-16]] == 0).sum() < 10 or len(idx) - 16 - (labels[idx[:-16]] == 0).sum() < 50
