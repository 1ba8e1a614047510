"""The study's two-stage method.

Stage 1: one step of KL(uniform || p) on the first forget batch.
Stage 2 (same optimizer state): per forget batch, the next batch of a retain
stream that cycles across epochs; both cut to their common size m; loss =
contrastive(z_f, stop_grad(z_r)) + cross-entropy(z_r).
"""
import functools

import jax.numpy as jnp

from jaxunlearn import losses, objectives, train

DISPLAY_NAME = "2-Stage"


def contrastive_retain(apply_fn, params, batch, *, temperature):
  f, r = batch["forget"], batch["retain"]
  B = f["mask"].shape[0]
  # Cut both to m = min(real forget, real retain). Real examples come first in a
  # batch row, so the cut is a prefix mask.
  m = jnp.minimum(jnp.sum(f["mask"]), jnp.sum(r["mask"]))
  mask_B = (jnp.arange(B) < m).astype(jnp.float32)
  # One forward pass over both batches (no dropout/BatchNorm: same as two passes).
  logits, _ = apply_fn(params, jnp.concatenate([f["image"], r["image"]]))
  z_f, z_r = logits[:B], logits[B:]
  con = losses.contrastive(z_f, z_r, mask_B, mask_B, temperature)
  ret = losses.cross_entropy(z_r, r["label"], mask_B)
  return con + ret, {"contrastive": con, "retain_ce": ret}


@functools.cache
def _stage2_objective(temperature: float):
  # One function object per temperature, so the compiled step is built once.
  return functools.partial(contrastive_retain, temperature=temperature)


def phases(config):
  return [
      train.Phase("stage1", objectives.kl_uniform,
                  {"data": train.Stream("forget", epochs=1, max_steps=config.two_stage.stage1_steps)}),
      train.Phase("stage2", _stage2_objective(config.two_stage.temperature),
                  {"forget": train.Stream("forget", epochs=config.unlearn_epochs),
                   "retain": train.Stream("retain")}),
  ]
