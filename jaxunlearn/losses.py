"""Losses as small pure functions of logits, labels and per-example masks.

A mask is 1.0 for a real example and 0.0 for padding, so a padded batch gives
exactly the loss of the unpadded one. Each loss averages over real examples.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def _masked_mean(values_B, mask_B):
  # max(.., 1) keeps an all-padding batch at 0 instead of NaN.
  return jnp.sum(values_B * mask_B) / jnp.maximum(jnp.sum(mask_B), 1.0)


def cross_entropy(logits_BxC, labels_B, mask_B):
  """Mean softmax cross-entropy -log p(y|x) over real examples."""
  ce_B = optax.softmax_cross_entropy_with_integer_labels(logits_BxC, labels_B)
  return _masked_mean(ce_B, mask_B)


def negated_cross_entropy(logits_BxC, labels_B, mask_B):
  """Gradient ascent: minimising this maximises the cross-entropy."""
  return -cross_entropy(logits_BxC, labels_B, mask_B)


def kl_uniform(logits_BxC, mask_B):
  """KL(u || p) with u uniform over the C classes, averaged over the batch.

  PyTorch's KLDivLoss(reduction='batchmean') with input log_softmax(logits) and
  target u: sum_c u_c (log u_c - log p_c), averaged over examples.
  """
  C = logits_BxC.shape[-1]
  log_p_BxC = jax.nn.log_softmax(logits_BxC, axis=-1)
  kl_B = jnp.sum((1.0 / C) * (-jnp.log(C) - log_p_BxC), axis=-1)
  return _masked_mean(kl_B, mask_B)


def contrastive(forget_logits_FxC, retain_logits_RxC, forget_mask_F, retain_mask_R, temperature):
  """The study's contrastive term: mean of -log_softmax(z_f z_r^T / tau) over all entries.

  Rows are forget queries, columns retain "negatives". No gradient flows through
  the retain logits in this term (the study fed a detached retain pass).
  Padded rows and columns are excluded from the softmax and from the mean.
  """
  z_r = jax.lax.stop_gradient(retain_logits_RxC)
  S_FxR = forget_logits_FxC @ z_r.T / temperature
  S_FxR = jnp.where(retain_mask_R[None, :] > 0, S_FxR, -jnp.inf)
  nll_FxR = -jax.nn.log_softmax(S_FxR, axis=-1)
  pair_mask_FxR = forget_mask_F[:, None] * retain_mask_R[None, :]
  nll_FxR = jnp.where(pair_mask_FxR > 0, nll_FxR, 0.0)
  return jnp.sum(nll_FxR) / jnp.maximum(jnp.sum(pair_mask_FxR), 1.0)


def kl_to_target(target_BxC, logits_BxC, mask_B):
  """KL(target || softmax(logits)) per example, averaged over real examples.

  PyTorch's KLDivLoss(reduction='batchmean')(log_softmax(logits), target); a zero
  target probability contributes 0 (xlogy), as in PyTorch.
  """
  log_q_BxC = jax.nn.log_softmax(logits_BxC, axis=-1)
  kl_B = jnp.sum(jax.scipy.special.xlogy(target_BxC, target_BxC) - target_BxC * log_q_BxC, axis=-1)
  return _masked_mean(kl_B, mask_B)


def distill_kl(student_BxC, teacher_BxC, mask_B, temperature):
  """Knowledge-distillation KL (SCRUB's DistillKL): KL(softmax(t/T) || softmax(s/T)) * T^2."""
  target = jax.nn.softmax(teacher_BxC / temperature, axis=-1)
  return kl_to_target(target, student_BxC / temperature, mask_B) * temperature ** 2


def l1_norm(params):
  """Sum of |theta| over every parameter (torch.linalg.norm(cat(params), ord=1))."""
  return sum(jnp.sum(jnp.abs(p)) for p in jax.tree.leaves(params))
