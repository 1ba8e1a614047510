"""What a train step minimises: functions of (ctx, params, batch) -> (loss, metrics).

`batch` maps a stream name to {"image" (float pixels in [0, 1]), "label", "mask",
"index", and each per-example table of the method's inputs}; `ctx` is the step's
`train.Context` (`ctx.apply(params, pixels)` returns (logits, features)).
Objectives are module-level functions, so the compiled step that uses one is built
once and shared by every phase and stage that uses it; their hyperparameters come
in as traced scalars (`ctx.hp`), so other values never recompile.
"""
from __future__ import annotations

from jaxunlearn import losses


def cross_entropy(ctx, params, batch):
  b = batch["data"]
  logits_BxC, _ = ctx.apply(params, b["image"], mask=b["mask"])
  return losses.cross_entropy(logits_BxC, b["label"], b["mask"]), {}


def kl_uniform(ctx, params, batch):
  b = batch["data"]
  logits_BxC, _ = ctx.apply(params, b["image"], mask=b["mask"])
  return losses.kl_uniform(logits_BxC, b["mask"]), {}
