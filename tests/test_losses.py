"""Each loss against a formula written independently in numpy/scipy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import log_softmax as np_log_softmax, softmax as np_softmax

from jaxunlearn import losses

rng = np.random.default_rng(0)
B, C = 7, 10


def _logits(b=B, scale=3.0):
  return (rng.normal(size=(b, C)) * scale).astype(np.float32)


def np_ce(logits, labels):
  return float(np.mean(-np_log_softmax(logits.astype(np.float64), -1)[np.arange(len(labels)), labels]))


def np_kl_uniform(logits):
  # torch KLDivLoss(batchmean)(log p, u) = sum_ij u (log u - log p_ij) / B
  u = 1.0 / C
  logp = np_log_softmax(logits.astype(np.float64), -1)
  return float(np.sum(u * (np.log(u) - logp)) / len(logits))


def np_contrastive(zf, zr, tau):
  S = zf.astype(np.float64) @ zr.astype(np.float64).T / tau
  return float(np.mean(-np_log_softmax(S, axis=-1)))


def test_cross_entropy_matches_numpy():
  logits, labels = _logits(), rng.integers(0, C, B)
  got = losses.cross_entropy(logits, labels, np.ones(B, np.float32))
  np.testing.assert_allclose(got, np_ce(logits, labels), rtol=1e-5)
  np.testing.assert_allclose(losses.negated_cross_entropy(logits, labels, np.ones(B)),
                             -np_ce(logits, labels), rtol=1e-5)


def test_kl_uniform_matches_numpy_and_is_zero_at_uniform():
  logits = _logits()
  np.testing.assert_allclose(losses.kl_uniform(logits, np.ones(B)), np_kl_uniform(logits), rtol=1e-5)
  assert abs(float(losses.kl_uniform(np.full((B, C), 1.7, np.float32), np.ones(B)))) < 1e-6


def test_contrastive_matches_numpy():
  zf, zr = _logits(5), _logits(6)
  got = losses.contrastive(zf, zr, np.ones(5), np.ones(6), 1.15)
  np.testing.assert_allclose(got, np_contrastive(zf, zr, 1.15), rtol=1e-5)


def test_contrastive_has_no_gradient_through_retain_logits():
  zf, zr = _logits(4), _logits(4)
  g_f, g_r = jax.grad(losses.contrastive, argnums=(0, 1))(zf, zr, jnp.ones(4), jnp.ones(4), 1.15)
  assert np.all(np.asarray(g_r) == 0)
  assert np.abs(np.asarray(g_f)).sum() > 0


@pytest.mark.parametrize("name", ["cross_entropy", "negated_cross_entropy", "kl_uniform", "contrastive"])
def test_padding_does_not_change_loss(name):
  n, pad = 5, 3
  logits, labels = _logits(n), rng.integers(0, C, n)
  other = _logits(n)
  junk = _logits(pad, scale=50.0)
  mask = np.r_[np.ones(n), np.zeros(pad)].astype(np.float32)
  padded = np.concatenate([logits, junk])
  padded_labels = np.r_[labels, rng.integers(0, C, pad)]
  fn = getattr(losses, name)
  if name == "kl_uniform":
    a, b = fn(logits, np.ones(n)), fn(padded, mask)
  elif name == "contrastive":
    a = fn(logits, other, np.ones(n), np.ones(n), 1.15)
    b = fn(padded, np.concatenate([other, junk]), mask, mask, 1.15)
  else:
    a, b = fn(logits, labels, np.ones(n)), fn(padded, padded_labels, mask)
  np.testing.assert_allclose(a, b, rtol=1e-6)
  assert np.isfinite(float(b))


def _linear_step(loss_fn, W, x, lr=0.1):
  """One SGD step on a linear classifier logits = x @ W."""
  g = jax.grad(lambda W: loss_fn(x @ W))(W)
  return W - lr * g


def test_gradient_ascent_raises_cross_entropy():
  x, W = rng.normal(size=(B, 4)).astype(np.float32), rng.normal(size=(4, C)).astype(np.float32)
  y = rng.integers(0, C, B)
  W2 = _linear_step(lambda z: losses.negated_cross_entropy(z, y, jnp.ones(B)), W, x)
  assert np_ce(x @ np.asarray(W2), y) > np_ce(x @ W, y) + 1e-3


def test_uniform_kl_step_moves_predictions_towards_uniform():
  x, W = rng.normal(size=(B, 4)).astype(np.float32), (3 * rng.normal(size=(4, C))).astype(np.float32)
  W2 = np.asarray(_linear_step(lambda z: losses.kl_uniform(z, jnp.ones(B)), W, x))

  def mean_entropy(z):
    p = np_softmax(z.astype(np.float64), -1)
    return float(np.mean(-np.sum(p * np.log(p), -1)))

  assert mean_entropy(x @ W2) > mean_entropy(x @ W)
  assert np_kl_uniform(x @ W2) < np_kl_uniform(x @ W)


def test_kl_to_target_matches_scipy_with_zero_targets():
  from scipy.special import rel_entr
  logits = _logits()
  target = np_softmax(_logits().astype(np.float64), -1)
  target[:, 3] = 0  # a zero target probability contributes nothing (DELETE's masked class)
  target /= target.sum(-1, keepdims=True)
  q = np_softmax(logits.astype(np.float64), -1)
  want = np.sum(rel_entr(target, q)) / B
  got = losses.kl_to_target(jnp.asarray(target, jnp.float32), logits, np.ones(B, np.float32))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert np.isfinite(got)


def test_distill_kl_matches_repdistiller_formula():
  # SCRUB's DistillKL: kl_div(log_softmax(s/T), softmax(t/T), sum) * T^2 / B.
  s, t, T = _logits(), _logits(), 4.0
  p_t = np_softmax(t.astype(np.float64) / T, -1)
  want = np.sum(p_t * (np.log(p_t) - np_log_softmax(s.astype(np.float64) / T, -1))) * T ** 2 / B
  got = losses.distill_kl(s, t, np.ones(B, np.float32), T)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  mask = (np.arange(B) < 4).astype(np.float32)  # padded rows count for nothing
  want4 = np.sum((p_t * (np.log(p_t) - np_log_softmax(s.astype(np.float64) / T, -1)))[:4]) * T ** 2 / 4
  np.testing.assert_allclose(losses.distill_kl(s, t, mask, T), want4, rtol=1e-5)


def test_l1_norm_is_the_sum_of_absolute_values_over_all_leaves():
  tree = {"a": rng.normal(size=(3, 4)).astype(np.float32), "b": {"c": rng.normal(size=5).astype(np.float32)}}
  want = np.abs(tree["a"]).sum() + np.abs(tree["b"]["c"]).sum()
  np.testing.assert_allclose(losses.l1_norm(tree), want, rtol=1e-6)
