"""Per-example evaluation metrics, written for one example and vmapped.

Each takes probabilities (not logits), as the study's metrics did.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _rel_entr(x, y):
  # scipy.special.rel_entr: x log(x / y), defined as 0 where x == 0.
  safe_x = jnp.where(x > 0, x, 1.0)
  return jnp.where(x > 0, x * (jnp.log(safe_x) - jnp.log(jnp.where(x > 0, y, 1.0))), 0.0)


def jensen_shannon_distance(p_C, q_C):
  """scipy.spatial.distance.jensenshannon(p, q) with its default natural-log base."""
  p_C = p_C / jnp.sum(p_C)
  q_C = q_C / jnp.sum(q_C)
  m_C = (p_C + q_C) / 2.0
  js = (jnp.sum(_rel_entr(p_C, m_C)) + jnp.sum(_rel_entr(q_C, m_C))) / 2.0
  # Rounding can leave js a hair below 0 for identical inputs; the distance is 0 there.
  return jnp.sqrt(jnp.maximum(js, 0.0))


def entropy(p_C):
  """The study's predictive entropy: -sum p log(p + 1e-9)."""
  return -jnp.sum(p_C * jnp.log(p_C + 1e-9))


def correct(p_C, label):
  return (jnp.argmax(p_C) == label).astype(jnp.float32)


# Batched forms: (N, C) probabilities -> (N,) values.
batch_jsd = jax.vmap(jensen_shannon_distance)
batch_entropy = jax.vmap(entropy)
batch_correct = jax.vmap(correct)
